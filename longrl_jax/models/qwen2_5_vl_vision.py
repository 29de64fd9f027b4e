"""The Qwen2.5-VL vision tower in Flax NNX: 3-D patch embedding, 2-D rotary attention in windows
(full attention at a few blocks), and the 2x2 patch merger into the LLM width.

Layout. A video becomes `Tp` temporal patches (pairs of frames); each is cut into an `h x w` grid
of patches listed in 2x2-merge order (the four patches of one merged unit are consecutive, units
row-major), the order of transformers' `pixel_values_videos`. Attention never crosses a temporal
patch, whole-patch or windowed, so the tower runs on `[Tp, N = h*w, ...]` with the temporal
patches as the batch: they encode independently (MR-SP stage 1 can shard them over devices, and
cached embeddings per video stay exact).

Windows. transformers reorders the units into windows of `window_units x window_units` merged
units, attends within each window, and undoes the reordering after the merger. Attention is
invariant to the order of its keys, so here tokens keep their order and a mask allows only pairs
in the same window; the merger works unit by unit, so its output is already in the original order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longrl_jax.models.config import Qwen25VisionConfig
from longrl_jax.models.layers import Einsum, RMSNorm, apply_rope, default_kernel_init, param

VISION_ROPE_THETA = 10000.0


# --------------------------------------------------------------------------- host-side layout
def check_grid(cfg: Qwen25VisionConfig, h: int, w: int) -> None:
    m = cfg.spatial_merge_size
    if h <= 0 or w <= 0 or h % m or w % m:
        raise ValueError(f"a patch grid of {h} x {w} is not a positive multiple of the spatial "
                         f"merge size {m} (frames must be multiples of {m * cfg.patch_size} px)")


@functools.lru_cache(maxsize=64)
def _grid_layout(cfg: Qwen25VisionConfig, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(row and column of each patch [N, 2], window id of each patch [N]) in 2x2-merge order."""
    check_grid(cfg, h, w)
    m, u = cfg.spatial_merge_size, cfg.window_units
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // m, m, w // m, m)
    hw_n2 = np.stack([rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
                      cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)
    unit_r, unit_c = hw_n2[:, 0] // m, hw_n2[:, 1] // m
    windows_per_row = -(-(w // m) // u)
    window_n = (unit_r // u) * windows_per_row + unit_c // u
    return hw_n2, window_n


def vision_rope(cfg: Qwen25VisionConfig, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [N, head_dim] of the 2-D rotary embedding: the first half of the frequencies
    rotate by the patch row, the second half by its column (transformers' axial rope)."""
    hw_n2, _ = _grid_layout(cfg, h, w)
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (np.arange(0, 2 * quarter, 2, dtype=np.float32)
                                            / np.float32(2 * quarter)))
    freqs = hw_n2[:, :, None].astype(np.float32) * inv_freq.astype(np.float32)  # [N, 2, H/4]
    freqs = freqs.reshape(len(hw_n2), -1)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def window_mask(cfg: Qwen25VisionConfig, h: int, w: int) -> np.ndarray:
    """[N, N] bool: patch pairs in the same attention window."""
    _, window_n = _grid_layout(cfg, h, w)
    return window_n[:, None] == window_n[None, :]


def patchify(frames_fhwc, cfg: Qwen25VisionConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised frames [F, H, W, C] -> patches [Tp, N, C*Tps*P*P] and the grid (Tp, h, w).

    An odd frame count repeats the last frame, as transformers' processor pads a video to whole
    temporal patches. H and W must be multiples of patch x merge (28 px): resizing belongs to the
    frame preprocessing, not here. NumPy in, NumPy out; a JAX array (or a tracer, under jit)
    stays one."""
    xp = jnp if isinstance(frames_fhwc, jax.Array) else np
    x = xp.asarray(frames_fhwc)
    if x.ndim != 4 or x.shape[-1] != cfg.num_channels:
        raise ValueError(f"frames must be [F, H, W, {cfg.num_channels}], got {x.shape}")
    f, hp, wp, c = x.shape
    p, tps, m = cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size
    if hp % (p * m) or wp % (p * m):
        raise ValueError(f"frames of {hp} x {wp} px are not multiples of {p * m} px")
    if f % tps:
        x = xp.concatenate([x, xp.repeat(x[-1:], tps - f % tps, axis=0)], axis=0)
    tp, h, w = x.shape[0] // tps, hp // p, wp // p
    x = x.reshape(tp, tps, h // m, m, p, w // m, m, p, c)
    #             0   1    2      3  4  5      6  7  8
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)   # Tp, h/m, w/m, m, m, C, Tps, P, P
    return x.reshape(tp, h * w, c * tps * p * p), (tp, h, w)


def unflatten_pixel_values(pixel_values, grid_thw, cfg: Qwen25VisionConfig) -> list[np.ndarray]:
    """transformers' `pixel_values_videos` [sum t*h*w, C*Tps*P*P] and `video_grid_thw` [V, 3]
    -> one [t, h*w, C*Tps*P*P] array per video."""
    pv = np.asarray(pixel_values, np.float32)
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    sizes = [int(t * h * w) for t, h, w in grid]
    if pv.ndim != 2 or pv.shape[1] != cfg.patch_dim or pv.shape[0] != sum(sizes):
        raise ValueError(f"pixel_values_videos {pv.shape} do not match video_grid_thw "
                         f"{grid.tolist()} ({sum(sizes)} patches of {cfg.patch_dim} values)")
    out, start = [], 0
    for (t, h, w), n in zip(grid, sizes):
        check_grid(cfg, int(h), int(w))
        out.append(pv[start:start + n].reshape(int(t), int(h * w), cfg.patch_dim))
        start += n
    return out


# ------------------------------------------------------------------------------- the modules
class Qwen25PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (Tps, P, P) and no bias: one matmul per flattened patch."""

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dtype = dtype
        c, t, p, d = cfg.num_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size
        self.kernel = param(rngs, default_kernel_init, (c, t, p, p, d),
                            (None, None, None, None, "vision_embed"), param_dtype)

    def __call__(self, patches_bnk: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        return jnp.einsum("BNK,KD->BND", patches_bnk.astype(self.dtype), k.reshape(-1, k.shape[-1]))


def _attention(q_bnth, k_bnsh, v_bnsh, mask_ts):
    """Bidirectional softmax attention in float32, keys limited by `mask_ts` (None: all)."""
    h = q_bnth.shape[-1]
    logits = jnp.einsum("BTNH,BSNH->BNTS", q_bnth.astype(jnp.float32),
                        k_bnsh.astype(jnp.float32)) / np.sqrt(h).astype(np.float32)
    if mask_ts is not None:
        logits = jnp.where(mask_ts[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v_bnsh.astype(jnp.float32)).astype(q_bnth.dtype)


class Qwen25VisionAttention(nnx.Module):
    """Fused qkv in transformers (one [3D, D] tensor); three projections here, split on load."""

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        axes = ("vision_embed", "vision_heads", "head_dim")
        self.q = Einsum("BTD,DNH->BTNH", (d, n, h), axes, bias_axes=axes[1:], **kw)
        self.k = Einsum("BTD,DNH->BTNH", (d, n, h), axes, bias_axes=axes[1:], **kw)
        self.v = Einsum("BTD,DNH->BTNH", (d, n, h), axes, bias_axes=axes[1:], **kw)
        self.proj = Einsum("BTNH,NHD->BTD", (n, h, d), ("vision_heads", "head_dim", "vision_embed"),
                           bias_axes=("vision_embed",), **kw)

    def __call__(self, x_btd, cos_th, sin_th, mask_ts):
        cos, sin = cos_th[None], sin_th[None]
        q = apply_rope(self.q(x_btd).astype(jnp.float32), cos, sin).astype(x_btd.dtype)
        k = apply_rope(self.k(x_btd).astype(jnp.float32), cos, sin).astype(x_btd.dtype)
        return self.proj(_attention(q, k, self.v(x_btd), mask_ts))


class Qwen25VisionMLP(nnx.Module):
    """SwiGLU with biases."""

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Einsum("BTD,DF->BTF", (d, f), ("vision_embed", "vision_mlp"),
                                bias_axes=("vision_mlp",), **kw)
        self.up_proj = Einsum("BTD,DF->BTF", (d, f), ("vision_embed", "vision_mlp"),
                              bias_axes=("vision_mlp",), **kw)
        self.down_proj = Einsum("BTF,FD->BTD", (f, d), ("vision_mlp", "vision_embed"),
                                bias_axes=("vision_embed",), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen25VisionBlock(nnx.Module):

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Qwen25VisionAttention(cfg, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = Qwen25VisionMLP(cfg, **kw)

    def __call__(self, x_btd, cos_th, sin_th, mask_ts):
        x_btd = x_btd + self.attn(self.norm1(x_btd), cos_th, sin_th, mask_ts)
        return x_btd + self.mlp(self.norm2(x_btd))


class Qwen25PatchMerger(nnx.Module):
    """RMSNorm per patch -> the 4 patches of a merged unit concatenated -> Linear -> GELU (exact)
    -> Linear to the LLM width."""

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        dv, d4, d = cfg.hidden_size, cfg.hidden_size * cfg.merge_unit, cfg.out_hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.merge_unit = cfg.merge_unit
        self.ln_q = RMSNorm(dv, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp_0 = Einsum("BUE,EF->BUF", (d4, d4), ("vision_merged", "vision_mlp"),
                            bias_axes=("vision_mlp",), **kw)
        self.mlp_2 = Einsum("BUF,FD->BUD", (d4, d), ("vision_mlp", "embed"),
                            bias_axes=("embed",), **kw)

    def __call__(self, x_bnd):
        b, n, dv = x_bnd.shape
        x_bue = self.ln_q(x_bnd).reshape(b, n // self.merge_unit, self.merge_unit * dv)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x_bue), approximate=False))


class Qwen25VisionModel(nnx.Module):
    """`__call__(patches [Tp, N, K], (h, w)) -> [Tp, N/4, D]`: LLM-width rows of each temporal
    patch, merged units in row-major order (the order of the video's `<|video_pad|>` tokens)."""

    def __init__(self, cfg: Qwen25VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = Qwen25PatchEmbed(cfg, **kw)
        self.blocks = nnx.List([Qwen25VisionBlock(cfg, **kw) for _ in range(cfg.num_layers)])
        self.merger = Qwen25PatchMerger(cfg, **kw)

    def hidden_states(self, patches_bnk: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
        """The last block's output [Tp, N, Dv], before the merger."""
        h, w = (int(g) for g in grid_hw)
        if patches_bnk.ndim != 3 or patches_bnk.shape[1:] != (h * w, self.cfg.patch_dim):
            raise ValueError(f"patches must be [Tp, {h * w}, {self.cfg.patch_dim}] for a {h} x {w}"
                             f" grid, got {patches_bnk.shape}")
        cos, sin = vision_rope(self.cfg, h, w)
        mask = jnp.asarray(window_mask(self.cfg, h, w))
        x = self.patch_embed(jnp.asarray(patches_bnk))
        cos, sin = jnp.asarray(cos), jnp.asarray(sin)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if i in self.cfg.fullatt_block_indexes else mask)
        return x

    def __call__(self, patches_bnk: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
        return self.merger(self.hidden_states(patches_bnk, grid_hw))
