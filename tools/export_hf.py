"""Exports a model to the Hugging Face layout that transformers and vLLM load.

  python tools/export_hf.py --model_dir=/tmp/longvila_params --out=/tmp/export [--dtype=bfloat16]

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

MODEL_DIR = flags.DEFINE_string("model_dir", None, "params dir or HF checkpoint dir",
                                required=True)
OUT = flags.DEFINE_string("out", None, "output directory", required=True)
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                          "dtype of the written tensors")
TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None,
                                    "copy tokenizer files from here into the LLM directory")


def main(argv):
    del argv
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
