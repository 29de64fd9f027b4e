"""Exports a model to the Hugging Face layout that transformers and vLLM load.

  python tools/export_hf.py --model_dir=/tmp/longvila_params --out=/tmp/export [--dtype=bfloat16]
  python tools/export_hf.py --workdir=runs/demo --out=/tmp/export

`--workdir` exports the newest trained policy of a run: the final RL params, else the newest RL
checkpoint, else the final SFT params; the run's tokenizer is copied along.

`--model_dir` is a params directory written by `tools/import_hf.py` (or a trainer), or an HF
checkpoint directory (re-export, e.g. to change dtype). An LLM-only model becomes a plain Qwen2
directory; a VLM becomes `llm/`, `vision_tower/`, `mm_projector/` and `config.json`.
"""

import os
import sys

import jax.numpy as jnp
from absl import app, flags

from longrl_jax import checkpoint
from longrl_jax.models import hf

MODEL_DIR = flags.DEFINE_string("model_dir", None, "params dir or HF checkpoint dir")
WORKDIR = flags.DEFINE_string("workdir", None, "a training run's --workdir")
OUT = flags.DEFINE_string("out", None, "output directory", required=True)
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                          "dtype of the written tensors")
TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None,
                                    "copy tokenizer files from here into the LLM directory")


def from_workdir(workdir: str):
    """(model, tokenizer_dir) of the newest trained policy in a run directory (the one
    `tools/evaluate.py --workdir` evaluates)."""
    from longrl_jax.evaluate import load_policy
    return load_policy(workdir=workdir)


def main(argv):
    del argv
    if bool(MODEL_DIR.value) == bool(WORKDIR.value):
        sys.exit("export_hf: give exactly one of --model_dir and --workdir")
    if WORKDIR.value:
        try:
            model, tok = from_workdir(WORKDIR.value)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"export_hf: {e}")
        hf.save_pretrained(model, OUT.value, dtype=getattr(jnp, DTYPE.value),
                           tokenizer_dir=TOKENIZER_DIR.value or tok)
        print(f"exported {WORKDIR.value} -> {OUT.value} ({DTYPE.value}): "
              f"{sorted(os.listdir(OUT.value))}")
        return
    try:
        if checkpoint.is_params_dir(MODEL_DIR.value):
            model = checkpoint.load_params(MODEL_DIR.value)
        else:
            model = hf.load_pretrained(MODEL_DIR.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"export_hf: {e}")
    hf.save_pretrained(model, OUT.value, dtype=getattr(jnp, DTYPE.value),
                       tokenizer_dir=TOKENIZER_DIR.value)
    print(f"exported {MODEL_DIR.value} -> {OUT.value} ({DTYPE.value}): "
          f"{sorted(os.listdir(OUT.value))}")


if __name__ == "__main__":
    app.run(main)
