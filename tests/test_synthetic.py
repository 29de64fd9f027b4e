"""The synthetic suite: balanced categories and answers, evidence away from the first and last
frames and far apart, visible to uniform sampling, deterministic, tokenizable."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from longrl_jax.data import frames as video
from longrl_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, SAMPLE = 64, 16


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    r = subprocess.run([sys.executable, "tools/make_synthetic.py", f"--out={out}",
                        "--num_train=32", "--num_eval=8", f"--num_frames={FRAMES}",
                        f"--sample_frames={SAMPLE}", "--open_ended_fraction=0.2", "--seed=3",
                        "--tokenizer"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, [json.loads(line) for line in open(out / "train.jsonl")]


def test_categories_and_answers_are_balanced(suite):
    _, rows = suite
    assert collections.Counter(r["category"] for r in rows) == {c: 8 for c in synthetic.CATEGORIES}
    mcq = [r for r in rows if r["problem_type"] == "multiple_choice"]
    letters = collections.Counter(r["answer"] for r in mcq)
    assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 2
    for r in mcq:
        assert r["options"]["ABCD".index(r["answer"])] in r["problem"]
        assert len(set(r["options"])) == 4
    assert any(r["problem_type"] == "open_ended" for r in rows)


def test_first_and_last_frames_carry_no_evidence(suite):
    out, rows = suite
    for r in rows:
        events = r["meta"]["events"]
        assert all(0.1 * FRAMES <= e["start"] and e["start"] + e["length"] <= 0.9 * FRAMES
                   for e in events)
        if r["category"] == "temporal":
            a, b = sorted(events, key=lambda e: e["start"])
            assert b["start"] - a["start"] >= FRAMES // 8
        frames, _ = video.load_frames(str(out / "videos" / r["videos"][0]),
                                      video.Sampling(num_frames=FRAMES, size=64),
                                      normalized=False)
        for f in (frames[0], frames[-1]):  # only background
            assert np.abs(f.astype(int) - synthetic.BACKGROUND).max() < 30


def test_every_event_is_seen_by_uniform_sampling(suite):
    out, rows = suite
    for r in rows[:12]:
        frames, idx = video.load_frames(str(out / "videos" / r["videos"][0]),
                                        video.Sampling(num_frames=SAMPLE, size=32),
                                        normalized=False)
        for e in r["meta"]["events"]:
            seen = [k for k, t in enumerate(idx) if e["start"] <= t < e["start"] + e["length"]]
            assert seen, (r["problem_id"], e)
            q = e["quadrant"]
            cell = frames[seen[0], (q // 2) * 16 + 4:(q // 2) * 16 + 12,
                          (q % 2) * 16 + 4:(q % 2) * 16 + 12]
            colour = np.array(synthetic.COLORS[e["color"]])
            assert np.abs(cell.reshape(-1, 3).mean(0) - colour).max() < 60


def test_deterministic_for_a_seed(tmp_path):
    a = synthetic.make_example(5, seed=1, num_frames=32, size=32, split="train")
    b = synthetic.make_example(5, seed=1, num_frames=32, size=32, split="train")
    c = synthetic.make_example(5, seed=2, num_frames=32, size=32, split="train")
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert a[0] != c[0]


def test_tokenizer_covers_the_text(suite):
    from transformers import AutoTokenizer
    out, rows = suite
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    for r in rows[:8]:
        for word in re.findall(r"[A-Za-z]+", r["problem"] + " " + r["reasoning"]):
            assert len(tok(" " + word)["input_ids"]) == 1, word


@pytest.mark.parametrize("distractors", [True, False])
def test_ordered_options_are_fixed_balanced_and_true_to_the_video(distractors):
    fixed = {"spatial": list(synthetic.QUADRANTS), "counting": ["1", "2", "3", "4"],
             "needle": list(synthetic.NEEDLE_COLORS)}
    letters = collections.Counter()
    outcomes = collections.Counter()
    for i in range(64):
        row, _ = synthetic.make_example(i, seed=4, num_frames=48, size=32, split="train",
                                        options="ordered", distractors=distractors,
                                        sample_frames=16)
        cat, events, opts = row["category"], row["meta"]["events"], row["options"]
        answer = opts["ABCD".index(row["answer"])]
        letters[row["answer"]] += 1
        if cat in fixed:
            assert opts == fixed[cat]
        if cat == "needle":
            assert [e["color"] for e in events] == [answer]
        elif cat == "spatial":
            named = re.search(r"did the (\w+) (\w+) appear", row["problem"]).groups()
            target = [e for e in events if (e["color"], e["shape"]) == named]
            assert len(target) == 1 and synthetic.QUADRANTS[target[0]["quadrant"]] == answer
            assert len(events) == (3 if distractors else 1)
        elif cat == "counting":
            named = re.search(r"did the (\w+) (\w+) appear", row["problem"]).groups()
            n = sum((e["color"], e["shape"]) == named for e in events)
            assert str(n) == answer
            assert (len(events) > n) == distractors
        else:
            a, b = re.search(r"video: the (\w+ \w+) or the (\w+ \w+)\?", row["problem"]).groups()
            assert opts[:2] == [f"the {a}", f"the {b}"]
            seen = {f"{e['color']} {e['shape']}": e["start"] for e in events}
            if a in seen and b in seen:
                truth = (opts[2] if seen[a] == seen[b] else
                         opts[0] if seen[a] < seen[b] else opts[1])
            else:
                assert a not in seen and b not in seen
                truth = opts[3]
            assert answer == truth
            outcomes[row["answer"]] += 1
    assert letters == {L: 16 for L in "ABCD"}
    assert outcomes == {L: 4 for L in "ABCD"}  # all four temporal outcomes happen


def test_distractor_free_needs_ordered_options():
    with pytest.raises(ValueError, match="ordered"):
        synthetic.make_example(0, seed=0, num_frames=48, size=32, split="train",
                               distractors=False)


def test_brief_traces_state_the_evidence_without_frame_numbers():
    for i in range(16):
        row, _ = synthetic.make_example(i, seed=5, num_frames=48, size=32, split="train",
                                        options="ordered", distractors=False, traces="brief",
                                        sample_frames=16)
        trace, answer = row["reasoning"], row["options"]["ABCD".index(row["answer"])]
        assert "frame" not in trace and not re.search(r"\d{2}", trace)
        if row["category"] in ("needle", "spatial"):
            assert answer in trace
        elif row["category"] == "counting":
            assert f"appears {answer} times" in trace
    with pytest.raises(ValueError, match="brief"):
        synthetic.make_example(0, seed=0, num_frames=48, size=32, split="train", traces="brief")
