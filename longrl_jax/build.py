"""Objects built from an experiment config: the mesh, its sharding rules, the model.

Shared by the entry point and the tools, so every command reads a config the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longrl_jax.models import VLM, ModelConfig, flash, hf
from longrl_jax.parallel import mesh as mesh_lib
from longrl_jax.parallel import sequence


def rules(config) -> tuple:
    """The config's logical-axis rules as the tuple of pairs `parallel.mesh` takes (the
    default table for a partial config without them)."""
    table = config.get("sharding_rules", mesh_lib.DEFAULT_RULES)
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in table)


ATTENTION = ("dense", "flash")   # config.model.attention without a sequence axis
INIT_STD = 0.02   # what every random weight matrix starts with (transformers' initializer_range)


def _rescale_init(model, factor: float) -> None:
    """A fresh model's weight matrices are normal(0, 0.02); norms and biases are constants. A tiny
    model trained from scratch learns much faster from a fan-in-sized init (std ~ 1/sqrt(width)),
    so `config.model.init_std` rescales the random ones (never a loaded checkpoint)."""
    state = nnx.state(model, nnx.Param)

    def scale(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = [n for n in names if n != "value"][-1]
        return x * factor if name not in ("scale", "bias", "patch_bias") else x
    nnx.update(model, jax.tree_util.tree_map_with_path(scale, state))


def build_model(config, *, video_token_id: int | None = None,
                separator_token_id: int | None = None, adjust=None):
    """(model, mesh): the configured preset or checkpoint, created directly in its shards, with
    sequence-parallel attention installed when the mesh has a 'sequence' axis. A bad field
    raises ValueError naming it. Token ids given here (the run's tokenizer) override the
    config's, which may be -1 for "from the tokenizer". `adjust(ModelConfig) -> ModelConfig`
    changes a preset before it is built (benchmarks: fewer layers, another frame size).
    The attention kernel is installed here (`install_attention`)."""
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    axis_rules = rules(config)
    if config.model.checkpoint:
        model = hf.load_pretrained(config.model.checkpoint,
                                   param_dtype=_dtype(config.model.param_dtype), mesh=mesh,
                                   rules=axis_rules, remat=config.model.remat,
                                   scan_layers=config.model.scan_layers)
    else:
        model = mesh_lib.create_sharded(
            _constructor(config, video_token_id, separator_token_id, adjust), mesh, axis_rules)
        if config.model.init_std != INIT_STD:
            _rescale_init(model, config.model.init_std / INIT_STD)
    _install(model.llm, mesh, config)
    return model, mesh


def copy_model(model, *, dtype=None, memory_kind: str | None = None):
    """A copy of `model` with buffers of its own (`nnx.clone` shares them, and a donated step
    would delete the original's): floating parameters cast to `dtype` if given, placed in
    `memory_kind` ("pinned_host" keeps them off the devices) with the same shardings."""
    graphdef, state = nnx.split(model)

    def copy(x):
        if not isinstance(x, jax.Array):
            return x
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        sharding = x.sharding
        if memory_kind is not None:
            sharding = sharding.with_memory_kind(memory_kind)
        return jax.device_put(x, sharding, may_alias=False)
    return nnx.merge(graphdef, jax.tree.map(copy, state))


def abstract_model(config, *, video_token_id: int | None = None,
                   separator_token_id: int | None = None, adjust=None):
    """(model, mesh) as `build_model` gives them, but abstract: every parameter a
    `jax.ShapeDtypeStruct` with the NamedSharding `build_model` would place it in, nothing
    allocated (`mesh.abstract_sharded`). For compiling the trainers' steps of a model larger
    than this host (`bench/trainer_memory.py`). A checkpoint contributes its config only;
    `adjust` applies to it too."""
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    model = mesh_lib.abstract_sharded(
        _constructor(config, video_token_id, separator_token_id, adjust), mesh, rules(config))
    _install(model.llm, mesh, config)
    return model, mesh


def _dtype(name: str):
    return getattr(jnp, name)


def model_config(config, *, video_token_id: int | None = None,
                 separator_token_id: int | None = None, adjust=None) -> ModelConfig:
    """The `ModelConfig` `build_model` builds: the checkpoint's, or the preset's with the
    token ids (given here, else the config's) and `adjust` applied."""
    if config.model.checkpoint:
        cfg, _ = hf.read_config(config.model.checkpoint)
        return adjust(cfg) if adjust is not None else cfg
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
    return cfg.replace(video_token_id=vid, separator_token_id=sep)


def _constructor(config, video_token_id, separator_token_id, adjust):
    """The function that creates the configured model (random weights). A checkpoint is
    created in its compute dtype = its param dtype, as `hf.load_pretrained` creates it."""
    cfg = model_config(config, video_token_id=video_token_id,
                       separator_token_id=separator_token_id, adjust=adjust)
    param_dtype = _dtype(config.model.param_dtype)
    dtype = param_dtype if config.model.checkpoint else _dtype(config.model.dtype)
    return lambda: VLM(cfg, rngs=nnx.Rngs(config.seed), param_dtype=param_dtype, dtype=dtype,
                       remat=config.model.remat, scan_layers=config.model.scan_layers)


def _install(llm, mesh, config) -> None:
    """What the config sets on a built LLM: its attention, remat offload and MLP pieces."""
    install_attention(llm, mesh, config)
    llm.remat_offload = bool(config.model.get("remat_offload", False))
    llm.mlp_chunk = int(config.model.get("mlp_chunk", 0))
    llm.seq_shards = mesh.shape["sequence"]


def install_attention(llm, mesh, config) -> None:
    """The attention kernel the config asks for: MR-SP's strategy when the mesh has a
    'sequence' axis, else blockwise flash (`model.attention="flash"`) or dense."""
    if mesh.shape["sequence"] > 1:
        sequence.use_sequence_parallel(llm, mesh, config.sp.strategy, layout=config.sp.layout,
                                       rules=rules(config))
    elif config.model.attention == "flash":
        llm.set_attention(flash.attention_fn())
