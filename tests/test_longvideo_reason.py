"""LongVideo-Reason reading: good rows become examples, every bad kind is reported with its
reason and skipped; TFDS array_record + grain round trip with shuffling, sharding and resume."""

import json
import os

import pytest

from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data import synthetic
from longrl_jax.data.frames import write_video


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("lvr")
    vdir = d / "videos"
    vdir.mkdir()
    _, frames = synthetic.make_example(0, seed=0, num_frames=32, size=32, split="train")
    write_video(str(vdir / "good.mp4"), frames)
    data = open(vdir / "good.mp4", "rb").read()
    (vdir / "empty.mp4").write_bytes(b"")
    (vdir / "corrupt.mp4").write_bytes(os.urandom(3000))
    (vdir / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (d / "outside.mp4").write_bytes(data)
    good = {"problem": "Which came first?\nOptions:\nA. red\nB. blue\nC. both\nD. none",
            "answer": "<answer>B</answer>", "videos": ["good.mp4"], "reasoning": "Red at 3.",
            "problem_id": "g1"}
    rows = [
        json.dumps(good),
        "{not json",
        json.dumps({"problem": "q", "videos": ["good.mp4"]}),
        json.dumps({**good, "answer": 3}),
        json.dumps({**good, "videos": ["../outside.mp4"]}),
        json.dumps({**good, "videos": ["missing.mp4"]}),
        json.dumps({**good, "videos": ["empty.mp4"]}),
        json.dumps({**good, "videos": ["corrupt.mp4"]}),
        json.dumps({**good, "videos": ["truncated.mp4"]}),
        json.dumps({"problem": "What colour?", "answer": "red", "videos": "good.mp4",
                    "problem_type": "open_ended"}),
        json.dumps({"problem": "Pick one.", "answer": "C", "videos": ["good.mp4"],
                    "options": ["x", "y", "z", "w"]}),
        json.dumps([1, 2]),
    ]
    path = d / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path, vdir


def test_reader_keeps_good_rows_and_reports_each_bad_one(mixed):
    path, vdir = mixed
    report = lvr.Report()
    got = list(lvr.read_jsonl(str(path), str(vdir), report))
    assert [i for i, _ in got] == [0, 9, 10]
    reasons = {s["row"]: s["reason"] for s in report.skipped}
    assert "malformed JSON" in reasons[1]
    assert "missing field 'answer'" in reasons[2]
    assert "answer is a int" in reasons[3]
    assert "escapes the video dir" in reasons[4]
    assert "missing video" in reasons[5]
    assert "empty video" in reasons[6]
    assert "unreadable" in reasons[7]
    assert "unreadable" in reasons[8] or "truncated" in reasons[8]
    assert "not an object" in reasons[11]
    assert report.read == 12 and report.kept == 3
    ex = got[0][1]
    assert ex.answer == "B" and ex.problem_type == "multiple_choice"
    assert ex.sft_target() == "<think>Red at 3.</think><answer>B</answer>"
    assert got[1][1].problem_type == "open_ended" and got[1][1].answer == "red"
    assert "D. w" in got[2][1].problem  # options given as a field are listed
    msgs = ex.messages()
    assert msgs[1]["content"].startswith(lvr.VIDEO_TOKEN) and "<think>" in msgs[0]["content"]


def test_array_record_and_grain_round_trip(tmp_path):
    syn = tmp_path / "syn"
    synthetic.generate(str(syn), num_train=12, num_eval=4, num_frames=32, size=32)
    report = lvr.build_array_records(str(tmp_path / "tfds"),
                                     {"train": str(syn / "train.jsonl"),
                                      "eval": str(syn / "eval.jsonl")}, str(syn / "videos"))
    assert report["train"]["kept"] == 12 and not report["train"]["skipped"]
    src = lvr.data_source(str(tmp_path / "tfds"), "train")
    assert len(src) == 12
    ids = {lvr.decode(src[i]).problem_id for i in range(12)}
    assert ids == {f"train-{i}" for i in range(12)}

    it = iter(lvr.loader(src, seed=0))
    first = [next(it).problem_id for _ in range(5)]
    state = it.get_state()
    rest = [ex.problem_id for ex in it]
    assert sorted(first + rest) == sorted(ids) and first != sorted(first)  # shuffled, complete
    again = iter(lvr.loader(src, seed=0))
    again.set_state(state)
    assert [ex.problem_id for ex in again] == rest  # resumes exactly
    halves = [{ex.problem_id for ex in lvr.loader(src, seed=0, shard_index=k, shard_count=2)}
              for k in range(2)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == ids


# ------------------------------------------------------------------ the spellings of a row
OPTS = ["Brazil", "Argentina", "France", "Spain"]


@pytest.mark.parametrize("row,answer,options_line", [
    # released LongVideo-Reason: "general", options written into the problem, <answer>X</answer>
    ({"problem": "Who wins?\nA. Brazil\nB. Argentina\nC. France\nD. Spain",
      "answer": "<answer>B</answer>", "problem_type": "general"}, "B", "A. Brazil"),
    ({"problem": "Who wins?\nA) Brazil\nB) Argentina\nC) France\nD) Spain", "answer": "B",
      "problem_type": "multiple choice"}, "B", "A) Brazil"),
    ({"problem": "Who wins? (A) Brazil (B) Argentina (C) France (D) Spain",
      "answer": "B. Argentina", "problem_type": "multiple-choice"}, "B", "(A) Brazil"),
    # Video-R1 / EasyR1: an options list, lettered or not
    ({"problem": "Who wins?", "options": OPTS, "answer": "B",
      "problem_type": "multiple choice"}, "B", "A. Brazil"),
    ({"problem": "Who wins?", "options": [f"{l}. {o}" for l, o in zip("ABCD", OPTS)],
      "answer": "<answer>B</answer>", "problem_type": "multiple_choice"}, "B", "A. Brazil"),
    ({"problem": "Who wins?", "options": [f"({l}) {o}" for l, o in zip("ABCD", OPTS)],
      "answer": "(B)"}, "B", "A. Brazil"),
    ({"problem": "Who wins?", "options": OPTS, "answer": "Argentina",
      "problem_type": "MCQ"}, "B", "A. Brazil"),
])
def test_every_spelling_of_a_multiple_choice_row(row, answer, options_line):
    for videos in ("v.mp4", ["v.mp4"]):
        ex = lvr.parse_row(dict(row, videos=videos), "/tmp", check_videos=False)
        assert ex.problem_type == "multiple_choice" and ex.answer == answer
        assert ex.videos == ("/tmp/v.mp4",)
        for o in OPTS:                       # every option reaches the prompt exactly once
            assert ex.problem.count(o) == 1, ex.problem
        assert options_line in ex.problem and "A. A." not in ex.problem
        assert "A. (A)" not in ex.problem
        user = ex.messages()[1]["content"]
        assert lvr.MCQ_SUFFIX in user
    # the original type string is the category when there is no category field
    assert ex.category == str(row.get("problem_type", ""))


@pytest.mark.parametrize("ptype", ["open-ended", "open_ended", "Open Ended", "general", None])
def test_open_ended_rows(ptype):
    row = {"problem": "What colour is the car?", "answer": "<answer>dark red</answer>",
           "videos": "v.mp4"}
    if ptype is not None:
        row["problem_type"] = ptype
    ex = lvr.parse_row(row, "/tmp", check_videos=False)
    assert ex.problem_type == "open_ended" and ex.answer == "dark red"
    assert lvr.MCQ_SUFFIX not in ex.messages()[1]["content"]


@pytest.mark.parametrize("row,reason", [
    ({"problem": "Who wins?\nA. Brazil\nB. Argentina", "answer": "E"}, "names none of the 2"),
    ({"problem": "Who wins?", "options": OPTS, "answer": "Uruguay"}, "names none of the 4"),
    ({"problem": "Who wins?", "options": "A. Brazil", "answer": "A"}, "options is not"),
    ({"problem": "Who wins?", "options": ["Brazil", ""], "answer": "A"}, "options is not"),
    ({"problem": "Who wins?", "answer": "Argentina", "problem_type": "multiple choice"},
     "not an option letter"),
])
def test_rows_that_cannot_be_understood_are_reported(row, reason):
    with pytest.raises(lvr.RowError, match=reason):
        lvr.parse_row(dict(row, videos="v.mp4"), "/tmp", check_videos=False)
