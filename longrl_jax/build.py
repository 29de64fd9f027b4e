"""Objects built from an experiment config: the mesh, its sharding rules, the model.

Shared by the entry point and the tools, so every command reads a config the same way.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from longrl_jax.models import VLM, ModelConfig, hf
from longrl_jax.parallel import mesh as mesh_lib


def rules(config) -> tuple:
    """The config's logical-axis rules as the tuple of pairs `parallel.mesh` takes."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)


def build_model(config, *, video_token_id: int | None = None,
                separator_token_id: int | None = None, adjust=None):
    """(model, mesh): the configured preset or checkpoint, created directly in its shards, with
    sequence-parallel attention installed when the mesh has a 'sequence' axis. A bad field
    raises ValueError naming it. Token ids given here (the run's tokenizer) override the
    config's, which may be -1 for "from the tokenizer". `adjust(ModelConfig) -> ModelConfig`
    changes a preset before it is built (benchmarks: fewer layers, another frame size)."""
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    axis_rules = rules(config)
    param_dtype = getattr(jnp, config.model.param_dtype)
    if config.model.checkpoint:
        model = hf.load_pretrained(config.model.checkpoint, param_dtype=param_dtype, mesh=mesh,
                                   rules=axis_rules, remat=config.model.remat,
                                   scan_layers=config.model.scan_layers)
    else:
        preset = getattr(ModelConfig, config.model.preset, None)
        if preset is None:
            raise ValueError(f"config.model.preset: unknown preset {config.model.preset!r}")
        kw = {"vocab_size": config.model.vocab_size} if config.model.preset in ("tiny", "small") \
            else {}
        vid = video_token_id if video_token_id is not None else config.model.video_token_id
        sep = separator_token_id if separator_token_id is not None else \
            config.model.separator_token_id
        cfg = preset(**kw)
        if adjust is not None:
            cfg = adjust(cfg)
        cfg = cfg.replace(video_token_id=vid, separator_token_id=sep)
        model = mesh_lib.create_sharded(
            lambda: VLM(cfg, rngs=nnx.Rngs(config.seed), param_dtype=param_dtype,
                        dtype=getattr(jnp, config.model.dtype), remat=config.model.remat,
                        scan_layers=config.model.scan_layers), mesh, axis_rules)
    if mesh.shape["sequence"] > 1:
        model.llm.enable_sequence_parallel(mesh, config.sp.strategy, layout=config.sp.layout)
    return model, mesh
