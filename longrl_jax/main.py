"""Entry point: `python -m longrl_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

Configs are ml_collections files with `get_config(arg)`, locked, overridable from the command
line (`--config.rl.steps=10`). The stages named in `config.stages` run in order: sft, then
(with eval) an evaluation of the SFT policy, rl, an evaluation of the RL policy, export.
Re-running with the same --workdir resumes: finished stages are skipped (their final params are
loaded), an interrupted stage continues from its last checkpoint.

The terminal shows progress bars and a few lines per stage; everything libraries log at INFO
(orbax, TFDS, our own modules) goes to WORKDIR/run.log.

Several processes (`jax.distributed`; README "Several hosts"): every process runs this same
command with `--config.distributed.coordinator=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I` (or under Slurm / on a TPU pod, where jax finds them itself).
Only process 0 writes files the run shares (stages.json, metrics, TensorBoard, the plot,
eval_summary.json, the export); checkpoints are saved by all together; each process logs to
WORKDIR/run.log (process 0) or run.<I>.log.
"""

from __future__ import annotations

import glob
import json
import logging as pylogging
import os
import shutil

from absl import app, flags
from ml_collections import config_flags

from longrl_jax import hosts

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run writes everything", required=True)


class Progress:
    """`WORKDIR/stages.json`: which stages finished, and the evaluation results so far."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "stages.json")
        self.state = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def done(self, name: str) -> bool:
        return name in self.state

    def mark(self, name: str, value=True) -> None:
        self.state[name] = value
        write_json(self.path, self.state)


def write_json(path: str, obj) -> None:
    """`obj` as JSON at `path`, atomically: readers see the old file or the whole new one.
    Process 0 writes; the others have the same `obj` and write nothing."""
    if not hosts.is_main():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_dir(path: str, fill) -> None:
    """`fill(tmp_dir)` writes a directory that then replaces `path`: a run killed while writing
    leaves the previous `path` (or none), never a half-written one; the next call sweeps what
    it left beside it. Process 0 writes; `fill` runs there only."""
    if not hosts.is_main():
        return
    for stale in glob.glob(glob.escape(path) + ".tmp*") + glob.glob(glob.escape(path) + ".old*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    fill(tmp)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ================================================================================================
# Setup
# ================================================================================================

def log_to_file(workdir: str) -> str:
    """INFO and above from every logger into WORKDIR/run.log (run.<I>.log for process I > 0);
    the terminal keeps warnings."""
    path = os.path.join(workdir, "run.log" if hosts.is_main() else f"run.{hosts.index()}.log")
    root = pylogging.getLogger()
    for h in root.handlers:
        h.setLevel(max(h.level, pylogging.WARNING))
    handler = pylogging.FileHandler(path)
    handler.setFormatter(pylogging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(pylogging.INFO)
    return path


def make_judge(config):
    from longrl_jax.rl import rewards
    if not config.judge.url:
        return None
    j = config.judge
    return rewards.Judge(rewards.JudgeConfig(url=j.url, model=j.model, api_key_env=j.api_key_env,
                                             timeout_s=j.timeout_s, max_retries=j.max_retries,
                                             max_concurrency=j.max_concurrency))


def setup(config, workdir: str):
    """The run's context: data on disk, the run's own tokenizer copy, model, mesh, metrics."""
    import jax
    from transformers import AutoTokenizer

    from longrl_jax import build
    from longrl_jax.context import RunContext
    from longrl_jax.data.prepare import prepare_data
    from longrl_jax.metrics import MetricWriter, Timers
    from longrl_jax.prompts import Tokens

    if hosts.is_main():      # one writer of the shared workdir; the others wait, then read
        records, _, tok_dir = prepare_data(config, workdir)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(os.path.join(workdir, "tokenizer"))
    hosts.barrier("longrl_jax.main: data prepared")
    if not hosts.is_main():
        records, _, _ = prepare_data(config, workdir)
    tok_dir = os.path.join(workdir, "tokenizer")  # the run's own copy: export and serving use it
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokens = Tokens.of(tokenizer)
    model, mesh = build.build_model(config, video_token_id=tokens.video,
                                    separator_token_id=tokens.separator)
    if len(tokenizer) > model.cfg.llm.vocab_size:
        raise SystemExit(f"longrl_jax.main: config.model.vocab_size: the tokenizer has "
                         f"{len(tokenizer)} tokens, the model {model.cfg.llm.vocab_size}")
    pylogging.getLogger(__name__).info("mesh %s, devices %s", dict(mesh.shape),
                                       jax.devices()[0].platform)
    return RunContext(config=config, workdir=workdir, model=model, mesh=mesh,
                      rules=build.rules(config), tokenizer=tokenizer, tokens=tokens,
                      tokenizer_dir=tok_dir, records_dir=records, writer=MetricWriter(workdir),
                      timers=Timers(), judge=make_judge(config))


# ================================================================================================
# Stages
# ================================================================================================

def say(line: str) -> None:
    """A line on the terminal (process 0's: the others run the same stages)."""
    if hosts.is_main():
        print(line, flush=True)


def load_final(ctx, stage: str) -> None:
    """A finished stage's parameters into the run's model, in the run's parameter dtype (a
    bfloat16 run resumed after SFT must not continue with float32 parameters)."""
    import jax.numpy as jnp
    from flax import nnx

    from longrl_jax import checkpoint
    loaded = checkpoint.load_params(ctx.path("params", stage), mesh=ctx.mesh, rules=ctx.rules,
                                    param_dtype=getattr(jnp, ctx.config.model.param_dtype))
    nnx.update(ctx.model, nnx.state(loaded, nnx.Param))


def run_sft(ctx, progress: Progress) -> None:
    from longrl_jax import checkpoint
    if progress.done("sft"):
        load_final(ctx, "sft")
        say("[sft] done earlier; its parameters are loaded")
        return
    from longrl_jax.sft import trainer as sft_trainer
    last = sft_trainer.train(ctx)
    checkpoint.save_params(ctx.model, ctx.path("params", "sft"))
    progress.mark("sft")
    say(f"[sft] {ctx.config.sft.steps} steps, final loss {last.get('loss', float('nan')):.4f}")


def run_eval(ctx, evaluator, progress: Progress, summary: dict, name: str, step: int) -> None:
    from longrl_jax.metrics import format_eval_report
    res = evaluator()
    summary[name] = res
    progress.mark("eval", summary)
    ctx.writer.write(step, {"eval/accuracy": res["accuracy"], "eval/format": res["format"]},
                     stage=f"eval_{name}")
    say(f"\n[eval {name}] accuracy {res['accuracy']:.3f}  format {res['format']:.3f}\n"
        + format_eval_report(res["per_category"]) + "\n")


def run_rl(ctx, connection, evaluator, progress: Progress) -> None:
    from longrl_jax import checkpoint
    if progress.done("rl"):
        load_final(ctx, "rl")
        connection.sync(ctx.model)
        say("[rl] done earlier; its parameters are loaded")
        return
    from longrl_jax.rl import trainer as rl_trainer
    last = rl_trainer.train(ctx, connection, evaluator)
    checkpoint.save_params(ctx.model, ctx.path("params", "rl"))
    progress.mark("rl")
    say(f"[rl] {ctx.config.rl.steps} steps, final reward "
        f"{last.get('reward/mean', float('nan')):.3f}")


def run_stages(ctx, progress: Progress) -> dict:
    """SFT, evaluation of the policy it leaves, RL, evaluation of the RL policy: the evaluation
    results by name."""
    stages = set(ctx.config.stages)
    if "sft" in stages:
        run_sft(ctx, progress)
    summary = dict(progress.state.get("eval", {}))
    if not {"rl", "eval"} & stages:
        return summary
    from longrl_jax.evaluate import Evaluator
    from longrl_jax.rl import process_connection
    connection = process_connection.connect(ctx.config, ctx.workdir, ctx.tokenizer_dir)
    evaluator = Evaluator(ctx, connection)
    before = "sft" if "sft" in stages else "initial"
    try:
        connection.start(ctx.model)
        if "eval" in stages and before not in summary:
            run_eval(ctx, evaluator, progress, summary, before, 0)
        if "rl" in stages:
            run_rl(ctx, connection, evaluator, progress)
            if "eval" in stages and "rl" not in summary:
                run_eval(ctx, evaluator, progress, summary, "rl", ctx.config.rl.steps)
    finally:
        connection.stop()
    return summary


# ================================================================================================
# Finish
# ================================================================================================

def finish(ctx, summary: dict) -> dict:
    """eval_summary.json, the plot, the HF export."""
    from longrl_jax.metrics import plot_run
    from longrl_jax.models import hf
    out = {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in summary.items()}
    out["skipped_videos"] = ctx.skipped_videos()
    write_json(ctx.path("eval_summary.json"), out)
    if hosts.is_main() and os.path.exists(ctx.writer.path):
        plot_run(ctx.writer.path, ctx.path("plot.png"))
    if "export" in ctx.config.stages:
        model = hosts.host_model(ctx.model)     # gathered by all; process 0 writes
        write_dir(ctx.path("export"), lambda d: hf.save_pretrained(
            model, d, tokenizer_dir=ctx.tokenizer_dir))
        say(f"[export] {ctx.path('export')}")
    ctx.writer.close()
    return out


def run(config, workdir: str) -> dict:
    from longrl_jax.config_check import validate

    errors = validate(config)
    if errors:
        raise SystemExit("longrl_jax.main: invalid config\n  " + "\n  ".join(errors))
    watch = start_processes(config)
    os.makedirs(workdir, exist_ok=True)
    say(f"longrl_jax: stages {', '.join(config.stages)}; log {log_to_file(workdir)}"
        + (f"; {hosts.count()} processes" if hosts.count() > 1 else ""))
    try:
        ctx = setup(config, workdir)
        summary = run_stages(ctx, Progress(workdir))
        out = finish(ctx, summary)
        hosts.barrier("longrl_jax.main: finished")
    except BaseException:
        watch.settle()        # a peer's death shows as a collective's error: name the peer
        raise
    watch.stop()
    return out


def start_processes(config) -> "hosts.PeerWatch":
    """Joins the run's other processes (`config.distributed`) before anything touches a
    device, and watches them: one that dies stops this one with an error naming it."""
    d = config.get("distributed")
    if d is not None:
        hosts.initialize(d)
    timeout = float(d.heartbeat_timeout_s) if d is not None else 20.0
    return hosts.PeerWatch(timeout_s=timeout).start()


def main(argv):
    del argv
    from longrl_jax.checkpoint import CheckpointError
    try:
        out = run(_CONFIG.value, _WORKDIR.value)
    except CheckpointError as e:   # a full disk or I/O error: one clear line, a non-zero exit
        raise SystemExit(f"longrl_jax.main: {e}") from None
    brief = {k: {m: round(v[m], 3) for m in ("accuracy", "format") if m in v}
             for k, v in out.items() if isinstance(v, dict) and "accuracy" in v}
    say(f"eval summary: {json.dumps(brief)}  ({_WORKDIR.value}/eval_summary.json)")


if __name__ == "__main__":
    app.run(main)
