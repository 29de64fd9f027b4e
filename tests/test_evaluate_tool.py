"""One evaluation, wherever it runs: the trainer's periodic evaluation, the run's final one and
`tools/evaluate.py` give the same numbers; the tool on LongVideo-Reason-eval and Video-MME files.

A demo-config run (CoT-SFT, 2 GRPO steps, evaluation with the judge) trains a policy on the
synthetic suite with some open-ended questions, which a fake OpenAI-compatible judge scores (its
verdict is a fixed function of the answer, so the judged accuracy is not the rule reward's).
The tool then evaluates that run's policy, with the run's own rollout-server path (vLLM, gRPC)
and real mp4s decoded by decord, on the run's questions rewritten in each benchmark's layout.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from longrl_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 16
MAX_TOKENS = 24
LENGTHS = ("short", "medium", "long")


class FakeJudge(http.server.ThreadingHTTPServer):
    """POST /v1/chat/completions: "Yes" iff the model answer has an even number of characters."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _JudgeHandler)
        self.asked = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = req["messages"][0]["content"].split("Model answer: ")[1].split("\n")[0]
        self.server.asked.append(answer)
        body = json.dumps({"choices": [{"message": {
            "role": "assistant", "content": "Yes" if len(answer) % 2 == 0 else "No"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _env():
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="",
                TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def judge():
    srv = FakeJudge()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, judge):
    """(workdir, data dir): the demo recipe at smoke size, evaluated periodically (step 2) and
    at the end, open-ended rows judged."""
    root = tmp_path_factory.mktemp("evalrun")
    data, workdir = str(root / "data"), str(root / "run")
    synthetic.generate(data, num_train=48, num_eval=12, num_frames=48, size=32, tokenizer=True,
                       sample_frames=FRAMES, options="ordered", distractors=False,
                       traces="brief", open_ended_fraction=0.3)
    overrides = {
        "dataset.kind": "jsonl", "dataset.train": f"{data}/train.jsonl",
        "dataset.eval": f"{data}/eval.jsonl", "dataset.video_dir": f"{data}/videos",
        "dataset.tokenizer": f"{data}/tokenizer", "data.num_frames": FRAMES,
        # enough SFT for answers in the tags (the scorers then disagree), RL too gentle to undo it
        "sft.steps": 60, "rl.steps": 2, "rl.eval_every": 2, "rl.max_response_tokens": 24,
        "rl.optimizer.lr": 1e-5,
        "eval.num_examples": 0, "eval.max_tokens": MAX_TOKENS, "judge.url": judge.url,
        "judge.model": "fake"}
    cmd = [sys.executable, "-m", "longrl_jax.main", "--config=configs/demo.py:quick",
           f"--workdir={workdir}", "--config.stages=('sft','rl','eval')",
           *[f"--config.{k}={v}" for k, v in overrides.items()]]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, data


@pytest.fixture(scope="module")
def server(run):
    """One rollout server for the tool runs that pass --rollout_address (each pushes its
    policy's weights to it first), started as the run started its own."""
    from longrl_jax.rl.connection import RolloutServerProcess
    workdir, _ = run
    srv = RolloutServerProcess(f"{workdir}/serve", args=["--max-model-len", "1024", "--dtype",
                                                         "float32", "--block-size", "32"],
                               env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                               log_path=f"{workdir}/tool_server.log").start()
    yield srv.address
    srv.stop()


def _tool(*args, timeout=600):
    cmd = [sys.executable, "tools/evaluate.py", f"--num_frames={FRAMES}",
           f"--max_tokens={MAX_TOKENS}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_periodic_final_and_tool_evaluations_agree(run, judge, tmp_path):
    workdir, data = run
    from longrl_jax.metrics import read_metrics
    rows = [json.loads(l) for l in open(f"{data}/eval.jsonl")]
    assert sum(r["problem_type"] == "open_ended" for r in rows) >= 3
    summary = json.load(open(f"{workdir}/eval_summary.json"))
    periodic = [r for r in read_metrics(f"{workdir}/metrics.jsonl")
                if r["stage"] == "rl" and "eval/accuracy" in r]
    assert [r["step"] for r in periodic] == [2]
    # the periodic evaluation at the last step and the final one: the same policy, questions
    # and settings (judge included), the same numbers
    assert periodic[0]["eval/accuracy"] == summary["rl"]["accuracy"]
    assert periodic[0]["eval/format"] == summary["rl"]["format"]
    assert summary["rl"]["n"] == len(rows)
    assert len(judge.asked) > 0       # the open-ended rows went to the judge

    # the tool, on the same questions with the same settings, through its own server
    asked = len(judge.asked)
    out = str(tmp_path / "same.json")
    r = _tool(f"--workdir={workdir}", "--benchmark=jsonl", f"--data={data}/eval.jsonl",
              f"--video_dir={data}/videos", f"--out={out}", f"--judge_url={judge.url}",
              "--judge_model=fake")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.load(open(out))
    assert report["num_examples"] == len(rows)
    assert report["accuracy"] == pytest.approx(summary["rl"]["accuracy"], abs=1e-12)
    assert report["format"] == pytest.approx(summary["rl"]["format"], abs=1e-12)
    for cat, v in summary["rl"]["per_category"].items():
        assert report["by_category"][cat]["count"] == v["n"]
        assert report["by_category"][cat]["accuracy"] == pytest.approx(v["accuracy"], abs=1e-12)
    assert len(judge.asked) > asked


# ------------------------------------------------------------------------------- benchmark files

def _released_rows(data: str) -> list[dict]:
    """The run's multiple-choice eval questions as the released LongVideo-Reason test file
    spells them: options inside the problem, `<answer>X</answer>`, type "general"; plus one row
    whose video is missing."""
    out = []
    for row in (json.loads(l) for l in open(f"{data}/eval.jsonl")):
        if row["problem_type"] != "multiple_choice":
            continue
        out.append({"problem_id": row["problem_id"], "problem": row["problem"],
                    "answer": f"<answer>{row['answer']}</answer>", "videos": row["videos"],
                    "data_type": "video", "problem_type": "general",
                    "category": row["category"].capitalize(), "reasoning": row["reasoning"]})
    out.append(dict(out[0], problem_id="gone", videos=["no_such_video.mp4"]))
    return out


def _videomme_rows(data: str) -> list[dict]:
    out = []
    for i, row in enumerate(json.loads(l) for l in open(f"{data}/eval.jsonl")):
        if row["problem_type"] != "multiple_choice":
            continue
        out.append({"video_id": f"{i:03d}", "duration": LENGTHS[i % 3], "domain": "Synthetic",
                    "sub_category": row["category"], "videoID": row["videos"][0][:-4],
                    "question_id": f"{i:03d}-1", "task_type": row["category"],
                    "question": row["problem"].split("\nOptions:")[0],
                    "options": [f"{'ABCD'[k]}. {o}" for k, o in enumerate(row["options"])],
                    "answer": row["answer"]})
    return out


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _responses(out):
    """The question records of a responses file (a line cut short by a kill left out)."""
    recs = []
    with open(out[:-5] + ".responses.jsonl") as f:
        for line in list(f)[1:]:
            try:
                recs.append(json.loads(line))
            except ValueError:
                break
    return recs


def test_longvideo_reason_eval_counts_and_resume(run, server, tmp_path):
    workdir, data = run
    rows = _released_rows(data)
    path = _write_jsonl(tmp_path / "test.jsonl", rows)
    common = (f"--workdir={workdir}", "--benchmark=longvideo_reason", f"--data={path}",
              f"--video_dir={data}/videos", "--batch=2", f"--rollout_address={server}")
    whole = str(tmp_path / "whole.json")
    r = _tool(*common, f"--out={whole}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.load(open(whole))
    good = rows[:-1]
    # every row counted once: answered or reported with its reason
    assert report["rows_read"] == len(rows)
    assert report["num_examples"] == len(good)
    assert [s["row"] for s in report["skipped"]] == [len(rows) - 1]
    assert "no_such_video.mp4" in report["skipped"][0]["reason"]
    want = {}
    for row in good:
        want[row["category"]] = want.get(row["category"], 0) + 1
    assert {k: v["count"] for k, v in report["by_category"].items()} == want
    for key in ("accuracy", "lenient_accuracy", "format"):
        assert 0.0 <= report[key] <= 1.0
    recs = _responses(whole)
    assert sorted(r["index"] for r in recs) == list(range(len(good)))
    assert all(len(r["accuracy"]) == len(r["lenient"]) == 1 for r in recs)
    assert report["settings"]["num_frames"] == FRAMES and report["settings"]["thinking"]
    md = open(whole[:-5] + ".md").read()
    assert "| **overall** |" in md and "lenient accuracy" in md

    # interrupted: SIGKILLed after some questions were answered, then run again
    cut = str(tmp_path / "cut.json")
    proc = subprocess.Popen([sys.executable, "tools/evaluate.py", f"--num_frames={FRAMES}",
                             f"--max_tokens={MAX_TOKENS}", *common, f"--out={cut}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    path_r = cut[:-5] + ".responses.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path_r) and len(open(path_r).readlines()) >= 3:   # header + 2
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    answered = len(_responses(cut))
    assert 2 <= answered < len(good)
    r = _tool(*common, f"--out={cut}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{answered} answered earlier" in r.stdout
    resumed = json.load(open(cut))
    assert {k: v for k, v in resumed.items() if k != "responses"} == \
        {k: v for k, v in report.items() if k != "responses"}
    assert sorted(_responses(cut), key=lambda r: r["index"]) == \
        sorted(recs, key=lambda r: r["index"])

    # other settings on the same --out are refused, not mixed in
    r = _tool(*common, f"--out={cut}", "--temperature=0.7")
    assert r.returncode != 0 and "other settings" in r.stderr and "Traceback" not in r.stderr


def test_videomme_by_duration_with_and_without_subtitles(run, server, tmp_path):
    """The lmms-eval parquet layout (JSON/JSONL readers: tests/test_evaluate.py)."""
    workdir, data = run
    rows = _videomme_rows(data)
    pd = pytest.importorskip("pandas", reason="parquet needs pandas and pyarrow")
    path = str(tmp_path / "test.parquet")
    pd.DataFrame(rows).to_parquet(path)
    subs = tmp_path / "subtitle"
    subs.mkdir()
    for row in rows:
        (subs / f"{row['videoID']}.srt").write_text(
            "1\n00:00:00,000 --> 00:00:03,000\nthe ball is red\n\n"
            "2\n00:01:00,000 --> 00:01:03,000\nafter the end of the video\n")
    reports = {}
    for name, extra in (("plain", ()), ("subs", (f"--subtitles={subs}",))):
        out = str(tmp_path / f"{name}.json")
        r = _tool(f"--workdir={workdir}", "--benchmark=videomme", f"--data={path}",
                  f"--video_dir={data}/videos", f"--out={out}", f"--rollout_address={server}",
                  *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        reports[name] = json.load(open(out))
        rep = reports[name]
        assert rep["num_examples"] == len(rows) and rep["skipped"] == []
        want = {}
        for row in rows:
            want[row["duration"]] = want.get(row["duration"], 0) + 1
        assert {k: v["count"] for k, v in rep["by_duration"].items()} == want
        assert sum(v["count"] for v in rep["by_category"].values()) == len(rows)
        assert rep["settings"]["subtitles"] == bool(extra)
        recs = _responses(out)
        assert len(recs) == len(rows)
    # the subtitle shown at the sampled frames' times reached the prompt; the later one did not
    from longrl_jax.data import videomme
    from longrl_jax.data.frames import Sampling
    item = videomme.read(path, f"{data}/videos")[0]
    ex = videomme.with_subtitles(item.example, str(subs / f"{item.video_id}.srt"),
                                 Sampling(num_frames=FRAMES, size=32))
    assert "the ball is red" in ex.problem and "after the end" not in ex.problem
