"""Model parameters as orbax checkpoints.

A params directory holds `model_config.json` (the ModelConfig, and whether the layers are
stacked for a scan) and `params/` (an orbax
StandardCheckpointer tree of the NNX parameters). The training issue adds the full
CheckpointManager (optimizer state, data iterator, RNG) on top of these two functions.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from longrl_jax.models import ModelConfig, VLM


def save_params(model: VLM, directory: str) -> None:
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump({"model": model.cfg.to_dict(), "scan_layers": model.llm.scan_layers}, f,
                  indent=2)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(directory, "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)),
              force=True)
    ckpt.wait_until_finished()


def is_params_dir(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "model_config.json")) and \
        os.path.isdir(os.path.join(directory, "params"))


def load_params(directory: str, *, param_dtype=jnp.float32, mesh=None, rules=None) -> VLM:
    """The model saved by `save_params`; with `mesh`, restored directly into its shards."""
    directory = os.path.abspath(directory)
    with open(os.path.join(directory, "model_config.json")) as f:
        meta = json.load(f)
    cfg = ModelConfig.from_dict(meta["model"])
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                          scan_layers=meta.get("scan_layers", False)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if mesh is not None:
        from longrl_jax.parallel import mesh as mesh_lib
        shardings = nnx.to_pure_dict(mesh_lib.state_shardings(nnx.state(abstract, nnx.Param), mesh,
                                                              rules or mesh_lib.DEFAULT_RULES))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              target, shardings)
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
