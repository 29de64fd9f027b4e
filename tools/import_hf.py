"""Imports a Hugging Face checkpoint (plain Qwen2 or LongVILA layout) into an orbax params dir.

  python tools/import_hf.py --hf_dir=/path/LongVILA-R1-7B --out=/tmp/longvila_params

Validates the checkpoint against its config (every tensor present, every shape right) and writes
`OUT/model_config.json` + `OUT/params/`, which trainers and `tools/export_hf.py` read.
"""

import sys

import jax
from absl import app, flags
from flax import nnx

from longrl_jax import checkpoint
from longrl_jax.models import hf

HF_DIR = flags.DEFINE_string("hf_dir", None, "HF checkpoint directory", required=True)
OUT = flags.DEFINE_string("out", None, "output params directory", required=True)


def main(argv):
    del argv
    try:
        model = hf.load_pretrained(HF_DIR.value)
    except ValueError as e:  # CheckpointError / ConfigError: one clear line, no stack trace
        sys.exit(f"import_hf: {e}")
    checkpoint.save_params(model, OUT.value)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    kind = "VLM" if model.cfg.is_vlm else "LLM only"
    print(f"imported {HF_DIR.value} -> {OUT.value} ({n / 1e6:.2f}M parameters, {kind})")


if __name__ == "__main__":
    app.run(main)
