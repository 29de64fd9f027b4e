"""Evaluates a trained policy on a benchmark: the paper's LongVideo-Reason-eval and Video-MME tables.

  python tools/evaluate.py --workdir=runs/demo --benchmark=jsonl \
      --data=runs/demo/data/eval.jsonl --video_dir=runs/demo/data/videos --out=/tmp/eval.json
  python tools/evaluate.py --checkpoint=/ckpt/LongVILA-R1-7B --benchmark=longvideo_reason \
      --data=longvideo_reason/test.jsonl --video_dir=longvideo_reason/videos --out=lvr.json \
      --num_frames=512
  python tools/evaluate.py --checkpoint=... --benchmark=videomme --data=videomme/test.parquet \
      --video_dir=videomme/data --subtitles=videomme/subtitle --out=videomme_sub.json

`--workdir` takes the newest policy of a training run, `--checkpoint` an HF export or a LongVILA /
Qwen checkpoint. Videos are embedded by the policy's own vision tower (MR-SP stage 1, cached in
`--cache_dir`) and answered by the rollout server (`python -m rollout_server`, started here from
the policy unless `--rollout_address` names a running one), scored by
`longrl_jax.evaluate` -- the function the trainer's evaluations call.

Writes `--out` (the report JSON: benchmark, num_examples, accuracy, lenient_accuracy, format,
by_category, by_duration for Video-MME, skipped rows with reasons, the settings), a Markdown table
beside it (`.md`), and every response as JSONL (`.responses.jsonl`). Rerunning with the same
`--out` resumes from the questions already answered there; a file written with other settings
is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile

from absl import app, flags

WORKDIR = flags.DEFINE_string("workdir", None, "a training run's --workdir (its newest policy)")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "an HF export or LongVILA/Qwen checkpoint")
BENCHMARK = flags.DEFINE_enum("benchmark", "jsonl", ["longvideo_reason", "videomme", "jsonl"],
                              "the file's layout")
DATA = flags.DEFINE_string("data", None, "the benchmark file (JSONL; Video-MME also parquet/JSON)",
                           required=True)
VIDEO_DIR = flags.DEFINE_string("video_dir", None, "where the videos are", required=True)
OUT = flags.DEFINE_string("out", None, "the report JSON", required=True)
NUM_FRAMES = flags.DEFINE_integer("num_frames", 16, "frames per video, uniform (0: use --fps)")
FPS = flags.DEFINE_float("fps", None, "frames per second instead of --num_frames")
MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "cap on the frames --fps samples")
THINKING = flags.DEFINE_boolean("thinking", True, "ask for <think> reasoning before the answer")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)")
N = flags.DEFINE_integer("n", 1, "samples per question; accuracy is their mean")
MAX_TOKENS = flags.DEFINE_integer("max_tokens", 1024, "response length cap")
SUBTITLES = flags.DEFINE_string("subtitles", None, "Video-MME .srt directory (<videoID>.srt)")
LIMIT = flags.DEFINE_integer("limit", 0, "evaluate the first N questions only (0: all)")
BATCH = flags.DEFINE_integer("batch", 16, "questions per rollout request")
SEED = flags.DEFINE_integer("seed", 0, "sampling seed (per question, batch-independent)")
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "video embedding cache (default: beside --out)")
ROLLOUT_ADDRESS = flags.DEFINE_string("rollout_address", None, "a running rollout server")
JUDGE_URL = flags.DEFINE_string("judge_url", None, "OpenAI-compatible judge for open-ended rows")
JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4o-mini", "the judge's model name")

# Where the released files and their variants keep a question's category, most specific first.
CATEGORY_FIELDS = ("category", "question_category", "task_type", "reasoning_type", "type")


def fail(msg: str):
    raise SystemExit(f"evaluate: {msg}")


# ================================================================================================
# Questions
# ================================================================================================

@dataclasses.dataclass
class Question:
    index: int                 # the row's position in the file: the resume key
    example: object            # longvideo_reason.Example
    extra: dict                # fields the report groups by beside the category


def _category(row: dict) -> str:
    for f in CATEGORY_FIELDS:
        if isinstance(row.get(f), str) and row[f].strip():
            return row[f].strip()
    return str(row.get("problem_type") or "")


def read_questions(benchmark: str, path: str, video_dir: str):
    """(questions, report): every good row; bad ones in the report with their reason."""
    from longrl_jax.data import longvideo_reason as lvr
    from longrl_jax.data import videomme
    report = lvr.Report()
    if benchmark == "videomme":
        items = videomme.read(path, video_dir, report, check_videos=False)
        return [Question(it.index, it.example, {"duration": it.duration, "domain": it.domain,
                                                "video_id": it.video_id}) for it in items], report
    raw = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            try:
                raw[i] = json.loads(line)
            except json.JSONDecodeError:
                pass
    out = []
    for i, ex in lvr.read_jsonl(path, video_dir, report, check_videos=False):
        if benchmark == "longvideo_reason" and isinstance(raw.get(i), dict):
            ex = dataclasses.replace(ex, category=_category(raw[i]) or ex.category)
        out.append(Question(i, ex, {}))
    return out, report


# ================================================================================================
# The responses file (resume)
# ================================================================================================

class Responses:
    """`<out>.responses.jsonl`: a header line with what the run asks, then one question record
    per line, appended and flushed as answered. A line cut short by a kill is dropped."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.records: dict[int, dict] = {}
        if os.path.exists(path):
            self._load(header)
        else:
            with open(path, "w") as f:
                f.write(json.dumps({"header": header}) + "\n")

    def _load(self, header: dict) -> None:
        good, lines = 0, open(self.path, "rb").read().split(b"\n")
        for k, line in enumerate(lines):
            try:
                obj = json.loads(line)
            except ValueError:
                break
            if k == 0:
                if obj.get("header") != header:
                    fail(f"{self.path} was written with other settings ({obj.get('header')}); "
                         "remove it or choose another --out")
            else:
                self.records[obj["index"]] = obj
            good += len(line) + 1
        with open(self.path, "r+b") as f:     # drop a partial last line before appending
            f.truncate(good)

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[r["index"]] = r


# ================================================================================================
# Report
# ================================================================================================

def build_report(records: list[dict], questions: list[Question], file_report, settings: dict,
                 responses_path: str) -> dict:
    from longrl_jax.evaluate import summarize
    extra = {q.index: q.extra for q in questions}
    records = [dict(r, **extra.get(r["index"], {})) for r in sorted(records, key=lambda r: r["index"])]
    s = summarize(records, keep_samples=0)
    table = lambda per: {k: {"count": v["n"], "accuracy": v["accuracy"],  # noqa: E731
                             "lenient_accuracy": v["lenient_accuracy"], "format": v["format"]}
                         for k, v in per.items()}
    report = {"benchmark": settings["benchmark"], "num_examples": s["n"],
              "accuracy": s["accuracy"], "lenient_accuracy": s["lenient_accuracy"],
              "format": s["format"], "by_category": table(s["per_category"])}
    if settings["benchmark"] == "videomme":
        report["by_duration"] = table(summarize(records, 0, group_by="duration")["per_category"])
    report["rows_read"] = file_report.read
    report["skipped"] = file_report.skipped
    report["settings"] = settings
    report["responses"] = responses_path
    return report


def markdown(report: dict) -> str:
    lines = [f"# {report['benchmark']}: {report['num_examples']} questions",
             "", f"settings: {json.dumps(report['settings'])}", ""]

    def table(title, per, overall=True):
        rows = ["", f"| {title} | count | accuracy | lenient accuracy | format |",
                "|---|---:|---:|---:|---:|"]
        if overall:
            rows.append(f"| **overall** | {report['num_examples']} | {report['accuracy']:.3f} | "
                        f"{report['lenient_accuracy']:.3f} | {report['format']:.3f} |")
        rows += [f"| {k} | {v['count']} | {v['accuracy']:.3f} | {v['lenient_accuracy']:.3f} | "
                 f"{v['format']:.3f} |" for k, v in per.items()]
        return rows
    lines += table("category", report["by_category"])
    if "by_duration" in report:
        lines += table("duration", report["by_duration"], overall=False)
    if report["skipped"]:
        lines += ["", f"{len(report['skipped'])} rows skipped:"]
        lines += [f"- row {s['row']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ================================================================================================
# Main
# ================================================================================================

def sampling_settings():
    from longrl_jax.evaluate import EvalSettings
    if (FPS.value is None) == (not NUM_FRAMES.value):
        fail("choose one of --num_frames (> 0) and --fps")
    return EvalSettings(max_tokens=MAX_TOKENS.value, temperature=TEMPERATURE.value, n=N.value,
                        thinking=THINKING.value, num_frames=NUM_FRAMES.value or None,
                        fps=FPS.value, max_frames=MAX_FRAMES.value, seed=SEED.value,
                        batch=BATCH.value)


def main(argv):
    del argv
    from transformers import AutoTokenizer

    from configs import common
    from longrl_jax import evaluate as ev
    from longrl_jax import metrics
    from longrl_jax.data import videomme
    from longrl_jax.data.frames import Sampling, VideoError
    from longrl_jax.embedder import VideoEmbedder
    from longrl_jax.parallel import mesh as mesh_lib
    from longrl_jax.prompts import Tokens, make_prompt
    from longrl_jax.rl import rewards
    from longrl_jax.rl.connection import RolloutConnection

    if bool(WORKDIR.value) == bool(CHECKPOINT.value):
        fail("give exactly one of --workdir and --checkpoint")
    for name, path in (("--data", DATA.value), ("--video_dir", VIDEO_DIR.value),
                       ("--subtitles", SUBTITLES.value)):
        if path and not os.path.exists(path):
            fail(f"{name} {path}: no such file or directory")
    if SUBTITLES.value and BENCHMARK.value != "videomme":
        fail("--subtitles is for --benchmark=videomme")
    try:
        settings = sampling_settings()
    except ValueError as e:
        fail(str(e))
    out = os.path.abspath(OUT.value)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    stem = out[:-5] if out.endswith(".json") else out
    info = {"benchmark": BENCHMARK.value, "data": os.path.abspath(DATA.value),
            "checkpoint": os.path.abspath(WORKDIR.value or CHECKPOINT.value),
            "subtitles": bool(SUBTITLES.value), "limit": LIMIT.value,
            "scorer": "r1v (math-aware, then exact <answer> match); lenient letter beside it",
            "judge": JUDGE_URL.value or None, **settings.to_dict()}

    questions, file_report = read_questions(BENCHMARK.value, DATA.value, VIDEO_DIR.value)
    if LIMIT.value:
        questions = questions[:LIMIT.value]
    # what decides the answers: a resume must match it (--limit and --batch do not)
    header = {k: v for k, v in info.items() if k not in ("limit", "batch")}
    responses = Responses(stem + ".responses.jsonl", header)
    for q in questions:
        r = responses.records.get(q.index)
        if r is not None and r["problem_id"] != q.example.problem_id:
            fail(f"{responses.path}: row {q.index} was {r['problem_id']!r}, the file now has "
                 f"{q.example.problem_id!r}; the data changed, choose another --out")
    pending = [q for q in questions if q.index not in responses.records]
    print(f"evaluate: {len(questions)} questions ({len(file_report.skipped)} bad rows), "
          f"{len(questions) - len(pending)} answered earlier", flush=True)

    if pending:
        try:
            mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1})
            model, tok_dir = ev.load_policy(workdir=WORKDIR.value, checkpoint=CHECKPOINT.value,
                                            mesh=mesh, rules=mesh_lib.DEFAULT_RULES)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        if tok_dir is None:
            fail("no tokenizer beside the policy (tokenizer_config.json)")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        tokens = Tokens.of(tokenizer)
        sampling = Sampling(num_frames=settings.num_frames, fps=settings.fps,
                            max_frames=settings.max_frames, size=model.cfg.vision.image_size)
        embedder = VideoEmbedder(model, mesh, sampling, CACHE_DIR.value or stem + ".cache",
                                 rules=mesh_lib.DEFAULT_RULES, frames_per_chunk=8,
                                 decode_batch=32, keep_in_memory=False)
        prompts = {}
        for q in metrics.progress(pending, desc="embed", unit="video"):
            ex = q.example
            try:
                if SUBTITLES.value:
                    ex = videomme.with_subtitles(
                        ex, os.path.join(SUBTITLES.value, q.extra["video_id"] + ".srt"),
                        sampling)
                key, rows = embedder(ex.videos[0])
            except FileNotFoundError:               # the rows were read without opening videos
                file_report.skip(q.index, f"video {ex.videos[0]} not found")
                continue
            except (VideoError, OSError) as e:
                file_report.skip(q.index, str(e))
                continue
            prompts[q.index] = make_prompt(tokenizer, tokens, ex, rows, key,
                                           thinking=settings.thinking)
        questions = [q for q in questions if q.index in prompts or q.index in responses.records]
        longest = max((p.layout.length for p in prompts.values()), default=0)
        judge = rewards.Judge(rewards.JudgeConfig(url=JUDGE_URL.value,
                                                  model=JUDGE_MODEL.value)) \
            if JUDGE_URL.value else None
        if prompts:
            cfg = common.rollout_config(max_model_len=-(-(longest + settings.max_tokens) // 64)
                                        * 64, dtype="float32", kvcache_gib=1, block_size=32,
                                        address=ROLLOUT_ADDRESS.value or "")
            import ml_collections
            config = ml_collections.ConfigDict({"rollout": cfg, "seed": settings.seed})
            serve = tempfile.mkdtemp(prefix="evaluate-serve-")
            connection = RolloutConnection(config, serve, tok_dir)
            bar = metrics.progress(len(questions), desc="evaluate", unit="question",
                                   initial=len(questions) - len(prompts))
            try:
                connection.start(model)
                ev.answer_questions(connection, prompts, tokenizer, tokens, settings,
                                    judge=judge, indices=sorted(prompts),
                                    on_records=lambda recs: (responses.add(recs),
                                                             bar.update(len(recs))))
            finally:
                bar.close()
                connection.stop()
                shutil.rmtree(serve, ignore_errors=True)

    records = [responses.records[q.index] for q in questions if q.index in responses.records]
    report = build_report(records, questions, file_report, info, responses.path)
    write_atomic(out, json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    write_atomic(stem + ".md", text)
    print(text)
    print(f"evaluate: report {out}, table {stem}.md, responses {responses.path}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    app.run(main)
