"""Hugging Face import and export, driven by one declarative mapping table per model family.

The same tables serve `load_pretrained`, `save_pretrained` and the weight sync to the rollout
server (`hf_arrays`), so a name or layout mistake cannot hide in one path and not the others.

A table row names a JAX parameter path, its HF tensor name, and how the layouts relate:
  copy     the same array
  linear   HF [out, in] <-> JAX kernel [in dims..., out dims...]  (`n_in` leading JAX dims are
           inputs: 1 for q/k/v [D, N, H], 2 for o_proj [N, H, D])
  reshape  HF flat bias [N*H] <-> JAX [N, H]
  conv     HF Conv2d [D, C, kh, kw] <-> JAX [kh, kw, C, D]
  conv3d   HF Conv3d [D, C, kt, kh, kw] <-> JAX [C, kt, kh, kw, D]
A row whose `jax` is a tuple reads one packed HF tensor split in equal parts along axis 0
(torch's MultiheadAttention `in_proj_weight` = q, k, v).

Layouts read: a plain Qwen2 directory (config.json + safetensors, sharded with an index or not),
a LongVILA directory (`llm/`, `vision_tower/`, `mm_projector/`, top-level `config.json`), or a
Qwen2.5-VL directory (one config.json, `model_type: qwen2_5_vl`), in either naming: the hub's,
which transformers 5 also writes (`visual.*`, `model.layers.*`, `model.embed_tokens.*`), or
transformers 4.52-4.x's (`model.visual.*`, `model.language_model.*`). Known wrapper prefixes (`llm.`,
`vision_tower.vision_tower.`, `vision_model.`, `mm_projector.`) are stripped and a family's
`aliases` renamed on load; saving writes the names transformers (5) writes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longrl_jax.models import safetensors_io
from longrl_jax.models.config import ConfigError, ModelConfig
from longrl_jax.models.vlm import VLM

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the message names the tensor or file."""


# ------------------------------------------------------------------------------ the tables
@dataclasses.dataclass(frozen=True)
class Rule:
    jax: str | tuple[str, ...]
    hf: str
    kind: str = "copy"
    n_in: int = 1
    when: Callable[[ModelConfig], bool] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    jax_prefix: str                  # attribute of the VLM holding this part
    save_prefix: str                 # prefix transformers expects on every HF name
    strip_prefixes: tuple[str, ...]  # wrapper prefixes removed on load
    num_layers: Callable[[ModelConfig], int]
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()     # HF tensors that are legitimately unused (regexes)
    aliases: tuple[tuple[str, str], ...] = ()  # (regex, replacement) to the table's names, on load


def _untied(cfg: ModelConfig) -> bool:
    return not cfg.llm.tie_word_embeddings


def _vision_head(cfg: ModelConfig) -> bool:
    return cfg.vision.use_head


_L = "layers.{i}."
_QL = "model.layers.{i}."
QWEN2 = Family(
    jax_prefix="llm", save_prefix="",
    strip_prefixes=("llm.", "language_model."),
    num_layers=lambda c: c.llm.num_layers,
    rules=(
        Rule("embed_tokens.embedding", "model.embed_tokens.weight"),
        Rule(_L + "input_layernorm.scale", _QL + "input_layernorm.weight"),
        Rule(_L + "self_attn.q_proj.kernel", _QL + "self_attn.q_proj.weight", "linear"),
        Rule(_L + "self_attn.q_proj.bias", _QL + "self_attn.q_proj.bias", "reshape"),
        Rule(_L + "self_attn.k_proj.kernel", _QL + "self_attn.k_proj.weight", "linear"),
        Rule(_L + "self_attn.k_proj.bias", _QL + "self_attn.k_proj.bias", "reshape"),
        Rule(_L + "self_attn.v_proj.kernel", _QL + "self_attn.v_proj.weight", "linear"),
        Rule(_L + "self_attn.v_proj.bias", _QL + "self_attn.v_proj.bias", "reshape"),
        Rule(_L + "self_attn.o_proj.kernel", _QL + "self_attn.o_proj.weight", "linear", n_in=2),
        Rule(_L + "post_attention_layernorm.scale", _QL + "post_attention_layernorm.weight"),
        Rule(_L + "mlp.gate_proj.kernel", _QL + "mlp.gate_proj.weight", "linear"),
        Rule(_L + "mlp.up_proj.kernel", _QL + "mlp.up_proj.weight", "linear"),
        Rule(_L + "mlp.down_proj.kernel", _QL + "mlp.down_proj.weight", "linear"),
        Rule("norm.scale", "model.norm.weight"),
        Rule("lm_head.kernel", "lm_head.weight", "linear", when=_untied),
    ),
    ignore=(r"rotary_emb\.inv_freq$", r"^lm_head\.weight$"),  # lm_head: tied checkpoints
)

_VL = "encoder.layers.{i}."
_ATTN = ("q_proj", "k_proj", "v_proj")
SIGLIP = Family(
    jax_prefix="vision_tower", save_prefix="vision_model.",
    strip_prefixes=("vision_tower.vision_tower.", "vision_tower.", "vision_model."),
    num_layers=lambda c: c.vision.num_layers,
    rules=(
        Rule("embeddings.patch_kernel", "embeddings.patch_embedding.weight", "conv"),
        Rule("embeddings.patch_bias", "embeddings.patch_embedding.bias"),
        Rule("embeddings.position_embedding", "embeddings.position_embedding.weight"),
        Rule(_L + "layer_norm1.scale", _VL + "layer_norm1.weight"),
        Rule(_L + "layer_norm1.bias", _VL + "layer_norm1.bias"),
        *(Rule(_L + f"self_attn.{p}.kernel", _VL + f"self_attn.{p}.weight", "linear")
          for p in _ATTN),
        *(Rule(_L + f"self_attn.{p}.bias", _VL + f"self_attn.{p}.bias", "reshape")
          for p in _ATTN),
        Rule(_L + "self_attn.out_proj.kernel", _VL + "self_attn.out_proj.weight", "linear",
             n_in=2),
        Rule(_L + "self_attn.out_proj.bias", _VL + "self_attn.out_proj.bias"),
        Rule(_L + "layer_norm2.scale", _VL + "layer_norm2.weight"),
        Rule(_L + "layer_norm2.bias", _VL + "layer_norm2.bias"),
        Rule(_L + "mlp.fc1.kernel", _VL + "mlp.fc1.weight", "linear"),
        Rule(_L + "mlp.fc1.bias", _VL + "mlp.fc1.bias"),
        Rule(_L + "mlp.fc2.kernel", _VL + "mlp.fc2.weight", "linear"),
        Rule(_L + "mlp.fc2.bias", _VL + "mlp.fc2.bias"),
        Rule("post_layernorm.scale", "post_layernorm.weight"),
        Rule("post_layernorm.bias", "post_layernorm.bias"),
        Rule("head.probe", "head.probe", when=_vision_head),
        Rule(tuple(f"head.attention.{p}.kernel" for p in _ATTN), "head.attention.in_proj_weight",
             "linear", when=_vision_head),
        Rule(tuple(f"head.attention.{p}.bias" for p in _ATTN), "head.attention.in_proj_bias",
             "reshape", when=_vision_head),
        Rule("head.attention.out_proj.kernel", "head.attention.out_proj.weight", "linear",
             n_in=2, when=_vision_head),
        Rule("head.attention.out_proj.bias", "head.attention.out_proj.bias", when=_vision_head),
        Rule("head.layernorm.scale", "head.layernorm.weight", when=_vision_head),
        Rule("head.layernorm.bias", "head.layernorm.bias", when=_vision_head),
        Rule("head.mlp.fc1.kernel", "head.mlp.fc1.weight", "linear", when=_vision_head),
        Rule("head.mlp.fc1.bias", "head.mlp.fc1.bias", when=_vision_head),
        Rule("head.mlp.fc2.kernel", "head.mlp.fc2.weight", "linear", when=_vision_head),
        Rule("head.mlp.fc2.bias", "head.mlp.fc2.bias", when=_vision_head),
    ),
    # A tower exported without its pooling head may still carry one in a full SigLIP checkpoint.
    ignore=(r"^head\.", r"position_ids$"),
)

PROJECTOR = Family(
    jax_prefix="mm_projector",
    save_prefix="", strip_prefixes=("model.mm_projector.", "mm_projector."),
    num_layers=lambda c: 0,
    rules=(
        Rule("layer_norm.scale", "layers.1.weight"),
        Rule("layer_norm.bias", "layers.1.bias"),
        Rule("linear_1.kernel", "layers.2.weight", "linear"),
        Rule("linear_1.bias", "layers.2.bias"),
        Rule("linear_2.kernel", "layers.4.weight", "linear"),
        Rule("linear_2.bias", "layers.4.bias"),
    ),
)

FAMILIES = {"llm": QWEN2, "vision_tower": SIGLIP, "mm_projector": PROJECTOR}

# Qwen2.5-VL: one directory, both parts in one set of safetensors. The table's names are what
# transformers 5 writes (and the hub's checkpoints hold): `visual.*`, `model.layers.*`,
# `model.embed_tokens.*`, `lm_head.*`; transformers 4.52-4.x wrote `model.visual.*` and
# `model.language_model.*`, renamed to them on load.
_QWEN2_5_VL_ALIASES = ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."))
QWEN2_5_VL_LLM = Family(
    jax_prefix="llm", save_prefix="", strip_prefixes=(),
    num_layers=lambda c: c.llm.num_layers,
    rules=QWEN2.rules,
    ignore=(r"rotary_emb\.inv_freq$", r"^lm_head\.weight$", r"^visual\."),
    aliases=_QWEN2_5_VL_ALIASES,
)
_B = "blocks.{i}."
QWEN2_5_VL_VISION = Family(
    jax_prefix="vision_tower", save_prefix="visual.", strip_prefixes=("visual.",),
    num_layers=lambda c: c.vision.num_layers,
    rules=(
        Rule("patch_embed.kernel", "patch_embed.proj.weight", "conv3d"),
        Rule(_B + "norm1.scale", _B + "norm1.weight"),
        Rule(tuple(_B + f"attn.{p}.kernel" for p in "qkv"), _B + "attn.qkv.weight", "linear"),
        Rule(tuple(_B + f"attn.{p}.bias" for p in "qkv"), _B + "attn.qkv.bias", "reshape"),
        Rule(_B + "attn.proj.kernel", _B + "attn.proj.weight", "linear", n_in=2),
        Rule(_B + "attn.proj.bias", _B + "attn.proj.bias"),
        Rule(_B + "norm2.scale", _B + "norm2.weight"),
        *(r for p in ("gate_proj", "up_proj", "down_proj")
          for r in (Rule(_B + f"mlp.{p}.kernel", _B + f"mlp.{p}.weight", "linear"),
                    Rule(_B + f"mlp.{p}.bias", _B + f"mlp.{p}.bias"))),
        Rule("merger.ln_q.scale", "merger.ln_q.weight"),
        Rule("merger.mlp_0.kernel", "merger.mlp.0.weight", "linear"),
        Rule("merger.mlp_0.bias", "merger.mlp.0.bias"),
        Rule("merger.mlp_2.kernel", "merger.mlp.2.weight", "linear"),
        Rule("merger.mlp_2.bias", "merger.mlp.2.bias"),
    ),
    ignore=(r"^model\.", r"^lm_head\."),
    aliases=_QWEN2_5_VL_ALIASES,
)
QWEN2_5_VL_FAMILIES = {"llm": QWEN2_5_VL_LLM, "vision_tower": QWEN2_5_VL_VISION}


def family_for(cfg: ModelConfig, part: str) -> Family:
    """The table of one part ('llm', 'vision_tower', 'mm_projector') of a model of `cfg`."""
    table = QWEN2_5_VL_FAMILIES if cfg.family == "qwen2_5_vl" else FAMILIES
    if part not in table:
        raise ValueError(f"a {cfg.family} model has no part {part!r}; parts: {sorted(table)}")
    return table[part]


def families_of(cfg: ModelConfig) -> list[Family]:
    if cfg.family == "qwen2_5_vl":
        return [QWEN2_5_VL_LLM, QWEN2_5_VL_VISION] if cfg.is_vlm else [QWEN2_5_VL_LLM]
    return [QWEN2, SIGLIP, PROJECTOR] if cfg.is_vlm else [QWEN2]


def expand(family: Family, cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Rule]]:
    """(JAX paths under the VLM, HF name without save_prefix, rule) for every tensor."""
    out = []
    n = family.num_layers(cfg)
    for rule in family.rules:
        if rule.when is not None and not rule.when(cfg):
            continue
        layer_range = range(n) if "{i}" in rule.hf else [None]
        for i in layer_range:
            paths = rule.jax if isinstance(rule.jax, tuple) else (rule.jax,)
            jax_paths = tuple(f"{family.jax_prefix}.{p.format(i=i)}" for p in paths)
            out.append((jax_paths, rule.hf.format(i=i), rule))
    return out


# -------------------------------------------------------------------- layout transforms
def to_jax_layout(hf: np.ndarray, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
    if rule.kind == "copy":
        return hf
    if rule.kind == "linear":
        return hf.T.reshape(shape)
    if rule.kind == "reshape":
        return hf.reshape(shape)
    if rule.kind == "conv":
        return hf.transpose(2, 3, 1, 0)
    if rule.kind == "conv3d":
        return hf.transpose(1, 2, 3, 4, 0)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def to_hf_layout(x: np.ndarray, rule: Rule) -> np.ndarray:
    if rule.kind == "copy":
        return x
    if rule.kind == "linear":
        n_in = math.prod(x.shape[:rule.n_in])
        return x.reshape(n_in, -1).T
    if rule.kind == "reshape":
        return x.reshape(-1)
    if rule.kind == "conv":
        return x.transpose(3, 2, 0, 1)
    if rule.kind == "conv3d":
        return x.transpose(4, 0, 1, 2, 3)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def hf_shape(shape: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
    """The HF shape that `to_hf_layout` gives for a JAX parameter of `shape`."""
    if rule.kind == "copy":
        return tuple(shape)
    if rule.kind == "linear":
        return (math.prod(shape[rule.n_in:]), math.prod(shape[:rule.n_in]))
    if rule.kind == "reshape":
        return (math.prod(shape),)
    if rule.kind == "conv3d":
        return (shape[4], *shape[:4])
    return (shape[3], shape[2], shape[0], shape[1])


# --------------------------------------------------------------------------- reading files
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {os.path.basename(path)} in {os.path.dirname(path)}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a directory's safetensors files (sharded with an index, or not)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.exists(os.path.join(directory, f)):
                raise CheckpointError(f"{index} names shard {f!r}, which is missing")
    else:
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory,
                                                                           "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(safetensors_io.load(os.path.join(directory, f)))
        except safetensors_io.SafetensorsError as e:
            raise CheckpointError(str(e)) from None
    return tensors


def _strip(name: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _rename(name: str, aliases: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in aliases:
        name = re.sub(pattern, repl, name)
    return name


def read_config(path: str) -> tuple[ModelConfig, dict[str, str]]:
    """The ModelConfig of a checkpoint directory and the directory of each part."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if os.path.isdir(os.path.join(path, "llm")):
        top = _read_json(os.path.join(path, "config.json")) \
            if os.path.exists(os.path.join(path, "config.json")) else {}
        dirs = {"llm": os.path.join(path, "llm")}
        llm_cfg = _read_json(os.path.join(dirs["llm"], "config.json"))
        vision_cfg = projector_cfg = None
        if os.path.isdir(os.path.join(path, "vision_tower")):
            dirs["vision_tower"] = os.path.join(path, "vision_tower")
            dirs["mm_projector"] = os.path.join(path, "mm_projector")
            vision_cfg = _read_json(os.path.join(dirs["vision_tower"], "config.json"))
            projector_cfg = _read_json(os.path.join(dirs["mm_projector"], "config.json"))
        cfg = ModelConfig.from_hf(llm_cfg, vision_cfg, projector_cfg, top)
    else:
        llm_cfg = _read_json(os.path.join(path, "config.json"))
        if llm_cfg.get("model_type") == "qwen2_5_vl":
            cfg = ModelConfig.from_qwen2_5_vl_hf(llm_cfg)
            return cfg, {"llm": path, "vision_tower": path}
        dirs = {"llm": path}
        cfg = ModelConfig.from_hf(llm_cfg, top_cfg=llm_cfg)
    return cfg, dirs


# ------------------------------------------------------------------------------- import
def _flat_state(model_or_state) -> dict[str, nnx.Variable]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}


_LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.(.*)$")


def locate(flat: Mapping[str, nnx.Variable], path: str) -> tuple[str, int | None]:
    """(state key, layer index) of a table path: '...layers.3.x' is key '...layers.x', slice 3,
    when the model stacks its layers for a scan; the path itself otherwise."""
    if path in flat:
        return path, None
    m = _LAYER.match(path)
    if m and f"{m.group(1)}.{m.group(3)}" in flat:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    raise KeyError(path)


def load_pretrained(path: str, *, param_dtype=jnp.float32, dtype=None, mesh=None,
                    rules=None, remat: bool = False, scan_layers: bool = False) -> VLM:
    """A VLM (or an LLM-only model reached as `.llm`) with the weights of an HF checkpoint.

    With `mesh`, each parameter is placed directly in its shard (logical axes + `rules`).
    """
    cfg, dirs = read_config(path)
    dtype = dtype or param_dtype
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: VLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat,
                    scan_layers=scan_layers)))
    flat = _flat_state(abstract)
    host: dict[str, np.ndarray] = {}   # filled on host, placed once complete
    filled: dict[str, int] = {}
    stacked: set[str] = set()
    for part, family in ((p, family_for(cfg, p)) for p in dirs):
        tensors = {_strip(_rename(k, family.aliases), family.strip_prefixes): v
                   for k, v in read_tensors(dirs[part]).items()}
        used: set[str] = set()
        for jax_paths, name, rule in expand(family, cfg):
            if name not in tensors:
                raise CheckpointError(f"checkpoint {dirs[part]} is missing tensor {name!r} "
                                      f"(for {', '.join(jax_paths)})")
            hf = tensors[name]
            used.add(name)
            pieces = np.split(hf, len(jax_paths), axis=0) if len(jax_paths) > 1 else [hf]
            for jp, piece in zip(jax_paths, pieces):
                key, layer = locate(flat, jp)
                shape = flat[key].shape if layer is None else flat[key].shape[1:]
                want = hf_shape(shape, rule)
                if tuple(piece.shape) != want:
                    raise CheckpointError(
                        f"tensor {name!r} in {dirs[part]} has shape {tuple(hf.shape)}; the "
                        f"config implies {want if len(jax_paths) == 1 else 'packed ' + str(want)}")
                arr = to_jax_layout(np.asarray(piece), rule, shape).astype(param_dtype)
                if layer is None:
                    host[key] = arr
                else:
                    host.setdefault(key, np.empty(flat[key].shape, arr.dtype))[layer] = arr
                    stacked.add(key)
                filled[key] = filled.get(key, 0) + 1
        unused = [k for k in tensors if k not in used
                  and not any(re.search(p, k) for p in family.ignore)]
        if unused:
            log.warning("%s: %d tensor(s) not used by the model, e.g. %s", dirs[part],
                        len(unused), unused[:5])
    incomplete = sorted(k for k, v in flat.items()
                        if filled.get(k, 0) != (v.shape[0] if k in stacked else 1))
    if incomplete:  # the table does not cover the model: a bug in this file, not in the checkpoint
        raise AssertionError(f"mapping table does not cover parameters {incomplete[:5]}")
    place = _placer(mesh, rules)
    flat = {k: v.replace(value=place(host[k], v)) for k, v in flat.items()}
    model = nnx.merge(graphdef, nnx.from_flat_state(
        {tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in flat.items()}))
    # pairs, not a dict: the model's graphdef keys jitted functions and must stay hashable
    model.source_dirs = tuple(sorted(dirs.items()))
    return model


def _placer(mesh, rules):
    if mesh is None:
        return lambda arr, var: jnp.asarray(arr)
    from longrl_jax.parallel import mesh as mesh_lib
    rules = rules or mesh_lib.DEFAULT_RULES
    return lambda arr, var: jax.device_put(arr, mesh_lib.variable_sharding(var, mesh, rules))


# ------------------------------------------------------------------------------- export
def hf_arrays(model: VLM, part: str = "llm", dtype=None) -> dict[str, np.ndarray]:
    """HF-named host arrays of one part ('llm', 'vision_tower', 'mm_projector'; Qwen2.5-VL has no
    'mm_projector'): what `save_pretrained` writes and what a weight sync sends."""
    family = family_for(model.cfg, part)
    if part != "llm" and not model.cfg.is_vlm:
        raise ValueError(f"an LLM-only model has no {part}")
    flat = _flat_state(model)
    out = {}

    def host(path):
        key, layer = locate(flat, path)
        value = flat[key][...] if layer is None else flat[key][...][layer]
        return np.asarray(jax.device_get(value))

    for jax_paths, name, rule in expand(family, model.cfg):
        pieces = [to_hf_layout(host(p), rule) for p in jax_paths]
        arr = np.concatenate(pieces, axis=0) if len(pieces) > 1 else pieces[0]
        if dtype is not None:
            arr = arr.astype(dtype)
        out[family.save_prefix + name] = np.ascontiguousarray(arr)
    return out


def _write_part(directory: str, tensors: Mapping[str, np.ndarray], config: dict,
                max_shard_bytes: int):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for old in glob.glob(os.path.join(directory, "model*.safetensors*")):
        os.remove(old)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        safetensors_io.save(os.path.join(directory, "model.safetensors"), shards[0], meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors_io.save(os.path.join(directory, fname), shard, meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json")


def save_pretrained(model: VLM, path: str, *, dtype=None, tokenizer_dir: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` in the HF layout: a plain Qwen2 directory for an LLM-only model; `llm/`,
    `vision_tower/`, `mm_projector/` and a top-level `config.json` for a VLM. Tokenizer files
    from `tokenizer_dir` (default: the directory the model was loaded from) are copied next to
    the LLM weights so transformers and vLLM can load `llm/` alone."""
    cfg = model.cfg
    if cfg.family == "qwen2_5_vl":
        _save_qwen2_5_vl(model, path, dtype, tokenizer_dir, max_shard_bytes)
        return
    llm_dir = os.path.join(path, "llm") if cfg.is_vlm else path
    llm_config = cfg.llm.to_hf()
    if dtype is not None:
        llm_config["dtype"] = np.dtype(dtype).name
    if not cfg.is_vlm:
        llm_config.update(video_token_id=cfg.video_token_id,
                          separator_token_id=cfg.separator_token_id)
    _write_part(llm_dir, hf_arrays(model, "llm", dtype), llm_config, max_shard_bytes)
    if cfg.is_vlm:
        _write_part(os.path.join(path, "vision_tower"), hf_arrays(model, "vision_tower", dtype),
                    cfg.vision.to_hf(), max_shard_bytes)
        _write_part(os.path.join(path, "mm_projector"), hf_arrays(model, "mm_projector", dtype),
                    cfg.projector.to_hf(), max_shard_bytes)
        top = {
            "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
            "llm_cfg": llm_config, "vision_tower_cfg": cfg.vision.to_hf(),
            "mm_projector_cfg": cfg.projector.to_hf(),
            "hidden_size": cfg.llm.hidden_size, "mm_hidden_size": cfg.vision.hidden_size,
            "mm_projector": cfg.projector.projector_type,
            "mm_vision_select_layer": cfg.vision.select_layer,
            "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "resize",
            "tokens_per_frame": cfg.tokens_per_frame,
            "video_token_id": cfg.video_token_id, "separator_token_id": cfg.separator_token_id,
        }
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(top, f, indent=2, sort_keys=True)
    _copy_tokenizer(model, llm_dir, tokenizer_dir)


def _copy_tokenizer(model: VLM, directory: str, tokenizer_dir: str | None) -> None:
    src = tokenizer_dir or dict(getattr(model, "source_dirs", ())).get("llm")
    if src and os.path.abspath(src) != os.path.abspath(directory):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(directory, name))


def _save_qwen2_5_vl(model: VLM, path: str, dtype, tokenizer_dir: str | None,
                     max_shard_bytes: int) -> None:
    """One directory as transformers 5 writes `Qwen2_5_VLForConditionalGeneration`: config.json
    and safetensors named `visual.*`, `model.*` (the LLM) and `lm_head.*` (untied only)."""
    cfg = model.cfg
    if not cfg.is_vlm:
        raise ValueError("saving an M-RoPE LLM without its vision tower is not supported: "
                         "transformers has no Qwen2.5-VL text-only checkpoint class")
    config = cfg.qwen2_5_vl_to_hf()
    if dtype is not None:
        config["dtype"] = np.dtype(dtype).name
    tensors = {**hf_arrays(model, "llm", dtype), **hf_arrays(model, "vision_tower", dtype)}
    _write_part(path, tensors, config, max_shard_bytes)
    _copy_tokenizer(model, path, tokenizer_dir)


__all__ = ["CheckpointError", "ConfigError", "FAMILIES", "PROJECTOR", "QWEN2", "QWEN2_5_VL_LLM",
           "QWEN2_5_VL_VISION", "Rule", "SIGLIP", "family_for", "hf_arrays", "load_pretrained",
           "read_config", "read_tensors", "save_pretrained"]
