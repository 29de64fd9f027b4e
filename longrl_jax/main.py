"""Entry point: `python -m longrl_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

Configs are ml_collections files with `get_config(arg)`, locked, overridable from the command
line (`--config.rl.steps=10`). The stages named in `config.stages` run in order: sft, then
(with eval) an evaluation of the SFT policy, rl, an evaluation of the RL policy, export.
Re-running with the same --workdir resumes: finished stages are skipped (their final params are
loaded), an interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run writes everything", required=True)

BUILT_STAGES: tuple[str, ...] = ("sft", "rl", "eval", "export")


class Progress:
    """`WORKDIR/stages.json`: which stages finished, and the evaluation results so far."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "stages.json")
        self.state = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def done(self, name: str) -> bool:
        return name in self.state

    def mark(self, name: str, value=True) -> None:
        self.state[name] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path)


def run(config, workdir: str) -> dict:
    from longrl_jax.config_check import validate

    errors = validate(config)
    if errors:
        raise SystemExit("longrl_jax.main: invalid config\n  " + "\n  ".join(errors))
    os.makedirs(workdir, exist_ok=True)

    import jax
    from transformers import AutoTokenizer

    from longrl_jax import build, checkpoint, evaluate, sequences
    from longrl_jax.metrics import MetricWriter, Timers, format_eval_report, plot_run
    from longrl_jax.models import hf
    from longrl_jax.rl import rewards
    from longrl_jax.run import RunContext, prepare_data
    from longrl_jax.video_embeds import VideoEmbedder

    # ---- data, tokenizer, model ---------------------------------------------------------------
    records, _, tok_dir = prepare_data(config, workdir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tok_dir = os.path.join(workdir, "tokenizer")  # the run's own copy: export and serving use it
    tokenizer.save_pretrained(tok_dir)
    tokens = sequences.Tokens.of(tokenizer)
    progress = Progress(workdir)
    model, mesh = build.build_model(config, video_token_id=tokens.video,
                                    separator_token_id=tokens.separator)
    if len(tokenizer) > model.cfg.llm.vocab_size:
        raise SystemExit(f"longrl_jax.main: config.model.vocab_size: the tokenizer has "
                         f"{len(tokenizer)} tokens, the model {model.cfg.llm.vocab_size}")
    logging.info("mesh %s, devices %s", dict(mesh.shape), jax.devices()[0].platform)
    rules = build.rules(config)
    embedder = VideoEmbedder(model, mesh, config, os.path.join(workdir, "cache"), rules)
    judge = None
    if config.judge.url:
        j = config.judge
        judge = rewards.Judge(rewards.JudgeConfig(url=j.url, model=j.model,
                                                  api_key_env=j.api_key_env,
                                                  timeout_s=j.timeout_s,
                                                  max_retries=j.max_retries,
                                                  max_concurrency=j.max_concurrency))
    ctx = RunContext(config=config, workdir=workdir, model=model, mesh=mesh, rules=rules,
                     tokenizer=tokenizer, tokens=tokens, tokenizer_dir=tok_dir,
                     records_dir=records, embedder=embedder, writer=MetricWriter(workdir),
                     timers=Timers(), judge=judge)
    params_dir = lambda stage: os.path.join(workdir, "params", stage)  # noqa: E731

    def load_final(stage):
        loaded = checkpoint.load_params(params_dir(stage), mesh=mesh, rules=rules)
        from flax import nnx
        nnx.update(model, nnx.state(loaded, nnx.Param))

    # ---- CoT-SFT ------------------------------------------------------------------------------
    if "sft" in config.stages:
        if progress.done("sft"):
            load_final("sft")
        else:
            from longrl_jax.sft import trainer as sft_trainer
            sft_frames = config.sft.get("num_frames", 0)
            sft_ctx = ctx if not sft_frames else dataclasses.replace(ctx, embedder=VideoEmbedder(
                model, mesh, config, os.path.join(workdir, "cache"), rules, num_frames=sft_frames))
            sft_trainer.train(sft_ctx)
            checkpoint.save_params(model, params_dir("sft"))
            progress.mark("sft")

    # ---- evaluation of the SFT (or initial) policy, then RL -----------------------------------------
    serving = None
    summary = dict(progress.state.get("eval", {}))
    before = "sft" if "sft" in config.stages else "initial"
    try:
        if {"rl", "eval"} & set(config.stages):
            from longrl_jax.rl.serving import Serving
            serving = Serving(config, workdir, tok_dir)
            serving.start(model)
        eval_prompts = ctx.prompts(ctx.eval_examples()) if "eval" in config.stages else []

        def run_eval(name, step):
            res = evaluate.evaluate(serving, eval_prompts, tokenizer, tokens,
                                    max_tokens=config.eval.max_tokens, judge=judge,
                                    temperature=config.eval.get("temperature", 0.0),
                                    seed=config.seed)
            summary[name] = res
            progress.mark("eval", summary)
            ctx.writer.write(step, {"eval/accuracy": res["accuracy"],
                                    "eval/format": res["format"]}, stage=f"eval_{name}")
            print(f"\n[{name}] accuracy {res['accuracy']:.3f}  format {res['format']:.3f}\n"
                  + format_eval_report(res["per_category"]), flush=True)

        if "eval" in config.stages and before not in summary:
            run_eval(before, 0)
        if "rl" in config.stages:
            if progress.done("rl"):
                load_final("rl")
                serving.sync(model)
            else:
                from longrl_jax.rl import trainer as rl_trainer
                rl_trainer.train(ctx, serving)
                checkpoint.save_params(model, params_dir("rl"))
                progress.mark("rl")
            if "eval" in config.stages and "rl" not in summary:
                run_eval("rl", config.rl.steps)
    finally:
        if serving is not None:
            serving.stop()

    # ---- summary, plot, export --------------------------------------------------------------------
    out = {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in summary.items()}
    out["skipped_examples"] = ctx.skipped
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    if os.path.exists(ctx.writer.path):
        plot_run(ctx.writer.path, os.path.join(workdir, "plot.png"))
    if "export" in config.stages:
        hf.save_pretrained(model, os.path.join(workdir, "export"), tokenizer_dir=tok_dir)
    ctx.writer.close()
    return out


def main(argv):
    del argv
    pylogging.getLogger("absl").setLevel(pylogging.INFO)
    out = run(_CONFIG.value, _WORKDIR.value)
    brief = {k: {m: round(v[m], 3) for m in ("accuracy", "format") if m in v}
             for k, v in out.items() if isinstance(v, dict) and "accuracy" in v}
    print(f"eval summary: {json.dumps(brief)}  ({_WORKDIR.value}/eval_summary.json)")


if __name__ == "__main__":
    app.run(main)
