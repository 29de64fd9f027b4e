"""The evaluation's pieces without a server: the lenient letter, the aggregation, the Video-MME
reader (JSON, JSONL, parquet when pandas is there) and subtitles near the sampled frames."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from longrl_jax import evaluate as ev
from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data import videomme
from longrl_jax.data.frames import Sampling, write_video


@pytest.mark.parametrize("response, count, want", [
    ("<think>x</think><answer>B</answer>", 4, "B"),
    ("<think>x</think><answer> (C) the cat</answer>", 4, "C"),
    ("<think>A or D?</think><answer>D. blue</answer>", 4, "D"),
    ("The best answer is: A", 4, "A"),
    ("<think>It is A</think> The answer is B.", 4, "B"),       # after </think>
    ("<answer>B", 4, "B"),                                       # unclosed tag
    ("<answer>E</answer>", 4, ""),                               # not one of four options
    ("<answer>E</answer>", 5, "E"),
    ("<answer>I think so</answer>", 4, ""),                      # "I" is not an option letter
    ("nothing here", 4, ""),
    ("<answer>Apple</answer>", 4, ""),                           # a word is not a letter
])
def test_lenient_letter(response, count, want):
    assert ev.lenient_letter(response, count) == want


def _record(index, category, acc, fmt, lenient=None):
    return {"index": index, "problem_id": str(index), "category": category, "answer": "A",
            "problem_type": "multiple_choice", "responses": ["r"] * len(acc), "accuracy": acc,
            "lenient": lenient if lenient is not None else acc, "format": fmt}


def test_summary_weighs_each_question_once_and_averages_its_samples():
    recs = [_record(0, "temporal", [1.0, 0.0, 0.0, 1.0], [1, 1, 1, 1], [1, 1, 0, 1]),
            _record(1, "temporal", [0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0]),
            _record(2, "spatial", [1.0, 1.0, 1.0, 1.0], [1, 0, 1, 0])]
    s = ev.summarize(recs)
    assert s["n"] == 3
    assert s["accuracy"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["lenient_accuracy"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert s["format"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert s["per_category"]["temporal"] == {"n": 2, "accuracy": 0.25, "lenient_accuracy": 0.375,
                                             "format": 0.5}
    assert s["per_category"]["spatial"]["n"] == 1


def test_question_record_scores_both_ways():
    ex = lvr.Example(problem_id="q", problem="Which?\nA. x\nB. y\nC. z", answer="B",
                     videos=("/v.mp4",), problem_type="multiple_choice", category="Temporal")

    class P:
        example = ex
    texts = ["<think>t</think><answer>B</answer>", "The answer is B", "<answer>C</answer>"]
    from longrl_jax.rl.rewards import compute_score
    rec = ev.question_record(3, P, texts, [compute_score(t, "B") for t in texts])
    assert rec["accuracy"] == [1.0, 0.0, 0.0]         # the original scorer needs the tags
    assert rec["lenient"] == [1.0, 1.0, 0.0]          # the letter is read without them
    assert rec["lenient_letters"] == ["B", "B", "C"]
    assert rec["format"] == [1.0, 0.0, 0.0]
    assert rec["category"] == "Temporal" and rec["index"] == 3


def test_batches_follow_runs_of_indices():
    assert ev._runs([0, 1, 2, 5, 6, 9]) == [[0, 1, 2], [5, 6], [9]]
    assert ev._runs([]) == []


def test_settings_check_their_values():
    with pytest.raises(ValueError):
        ev.EvalSettings(n=0)
    with pytest.raises(ValueError):
        ev.EvalSettings(temperature=-1)


# ------------------------------------------------------------------------------- Video-MME

def _videomme_rows(video_dir):
    os.makedirs(video_dir, exist_ok=True)
    frames = np.zeros((20, 32, 32, 3), np.uint8)
    for vid in ("vidA", "vidB"):
        write_video(os.path.join(video_dir, f"{vid}.mp4"), frames, fps=10)
    base = {"domain": "Knowledge", "question": "What color is the ball?",
            "options": ["A. red", "B. blue", "C. green", "D. white"]}
    return [dict(base, videoID="vidA", question_id="001-1", duration="short",
                 task_type="Counting Problem", answer="B"),
            dict(base, videoID="vidB", question_id="002-1", duration="long",
                 task_type="Temporal Reasoning", answer="D"),
            dict(base, videoID="missing", question_id="003-1", duration="long",
                 task_type="Temporal Reasoning", answer="A"),
            dict(base, videoID="vidA", question_id="004-1", duration="short",
                 task_type="Counting Problem", answer="F")]


def _check_items(items, report):
    assert [it.example.problem_id for it in items] == ["001-1", "002-1"]
    ex = items[0].example
    assert ex.problem_type == "multiple_choice" and ex.answer == "B"
    assert ex.category == "Counting Problem" and items[0].duration == "short"
    for letter, text in zip("ABCD", ("red", "blue", "green", "white")):
        assert ex.problem.count(f"{letter}. {text}") == 1        # lettered once
    assert "A. A." not in ex.problem
    assert report.read == 4 and report.kept == 2
    reasons = {s["row"]: s["reason"] for s in report.skipped}
    assert "no video missing" in reasons[2] and "names none of the 4 options" in reasons[3]


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_videomme_reader(tmp_path, layout):
    rows = _videomme_rows(str(tmp_path / "videos"))
    path = str(tmp_path / f"test.{layout}")
    with open(path, "w") as f:
        if layout == "json":
            json.dump(rows, f)
        else:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    report = lvr.Report()
    _check_items(videomme.read(path, str(tmp_path / "videos"), report), report)


def test_videomme_reader_parquet(tmp_path):
    pd = pytest.importorskip("pandas", reason="parquet needs pandas (and pyarrow)")
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow")
    rows = _videomme_rows(str(tmp_path / "videos"))
    path = str(tmp_path / "test.parquet")
    pd.DataFrame(rows).to_parquet(path)
    report = lvr.Report()
    _check_items(videomme.read(path, str(tmp_path / "videos"), report), report)


SRT = """1
00:00:00,000 --> 00:00:00,500
<i>first line</i>

2
00:00:00,500 --> 00:00:01,000
second line
continues

3
00:00:01,200 --> 00:00:01,400
never shown at a sampled frame

4
00:00:01,900 --> 00:00:02,500
last line
"""


def test_subtitles_near_the_sampled_frames(tmp_path):
    cues = videomme.read_srt(_write(tmp_path / "v.srt", SRT))
    assert cues[0] == (0.0, 0.5, "first line") and cues[1][2] == "second line continues"
    # 20 frames at 10 fps; 3 uniform frames: 0, 10, 19 -> 0.0 s, 1.0 s, 1.9 s
    video = str(tmp_path / "v.mp4")
    write_video(video, np.zeros((20, 32, 32, 3), np.uint8), fps=10)
    ex = lvr.Example(problem_id="q", problem="Q?\nA. a\nB. b", answer="A", videos=(video,),
                     problem_type="multiple_choice")
    got = videomme.with_subtitles(ex, str(tmp_path / "v.srt"), Sampling(num_frames=3, size=32))
    assert got.problem == ("This video's subtitles are listed below:\nfirst line\nlast line\n"
                           "Q?\nA. a\nB. b")
    none = videomme.with_subtitles(ex, str(tmp_path / "absent.srt"), Sampling(num_frames=3))
    assert none.problem.startswith("This video's subtitles are listed below:\n"
                                   "No subtitles available\nQ?")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------------------- ask

def test_response_split_into_reasoning_and_answer():
    from longrl_jax.answerer import split_response
    assert split_response("<think> a then b </think>\n<answer> B </answer>") == ("a then b", "B")
    assert split_response("<think>cut short") == ("cut short", "")
    assert split_response("no tags at all") == ("", "no tags at all")
    assert split_response("<think>x</think> C") == ("x", "C")


def test_a_question_becomes_an_example_like_a_row(tmp_path):
    from longrl_jax.answerer import question_example
    video = str(tmp_path / "v.mp4")
    write_video(video, np.zeros((8, 32, 32, 3), np.uint8), fps=8)
    ex = question_example(video, "Which came first?", ["A. red", "B. blue"])
    assert ex.problem_type == "multiple_choice" and ex.answer == ""
    assert ex.problem.count("A. red") == 1 and ex.problem.count("B. blue") == 1
    assert ex.videos == (os.path.realpath(video),)
    assert question_example(video, "What moves?").problem_type == "open_ended"
    with pytest.raises(ValueError, match="v_missing.mp4"):
        question_example(str(tmp_path / "v_missing.mp4"), "What moves?")


def test_a_loaded_checkpoint_encodes_videos(tmp_path):
    """`hf.load_pretrained` models go through MR-SP stage 1 (the tools load checkpoints so);
    the loader's record of its source directories once made the graphdef unhashable."""
    from flax import nnx

    from longrl_jax.models import VLM, ModelConfig, hf
    from longrl_jax.parallel import mesh as mesh_lib
    from longrl_jax.parallel.video_encoding import encode_video_sharded
    model = VLM(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    hf.save_pretrained(model, str(tmp_path / "ckpt"))
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1})
    loaded = hf.load_pretrained(str(tmp_path / "ckpt"), mesh=mesh, rules=mesh_lib.DEFAULT_RULES)
    frames = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    got = encode_video_sharded(loaded, frames, mesh=mesh, frames_per_chunk=4)
    want = encode_video_sharded(model, frames, mesh=mesh, frames_per_chunk=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
