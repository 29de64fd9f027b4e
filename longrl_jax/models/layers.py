"""Building blocks shared by the Qwen2 decoder, the SigLIP tower and the projector.

Every parameter carries `logical_axes` metadata (one name per dimension); `parallel/mesh.py` maps
those names to mesh axes through the rules in the config. Shape letters in names and einsums:
B batch, T query positions, S key positions, D model width, N query heads, K kv heads,
G query heads per kv head, H head dim, F/I hidden (MLP) width, V vocab.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

default_kernel_init = jax.nn.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], axes: Axes,
          dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axis names; `rngs=None` for deterministic inits (ones, zeros)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


class Einsum(nnx.Module):
    """A linear map written as an einsum, with an optional bias over the output dims.

    `eqn` names the input, kernel and output, e.g. 'BTD,DNH->BTNH' for a query projection.
    """

    def __init__(self, eqn: str, kernel_shape: Sequence[int], kernel_axes: Axes, *,
                 bias_axes: Axes | None = None, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, init: Initializer = default_kernel_init):
        self.eqn = eqn
        self.dtype = dtype
        self.kernel = param(rngs, init, kernel_shape, kernel_axes, param_dtype)
        out = eqn.split("->")[1]
        kernel_letters = eqn.split("->")[0].split(",")[1]
        if bias_axes is not None:
            bias_shape = [kernel_shape[kernel_letters.index(c)] for c in out if c in kernel_letters]
            self.bias = param(None, zeros, bias_shape, bias_axes, param_dtype)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in float32, scale in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = param(None, ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * x32.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = param(None, ones, (dim,), ("norm",), param_dtype)
        self.bias = param(None, zeros, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


class Embed(nnx.Module):
    """Token embedding table; `attend` is the tied LM head."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = param(rngs, default_kernel_init, (vocab, dim), ("vocab", "embed"),
                               param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...].astype(self.dtype), ids, axis=0)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", x_btd.astype(self.dtype),
                          self.embedding[...].astype(self.dtype))


# ------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions_bt: jax.Array, head_dim: int, theta: float,
                 scaling_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H] for the rotate-half RoPE layout transformers uses for Qwen2."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / scaling_factor
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(positions_3bt: jax.Array, head_dim: int, theta: float,
                  section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H] for Qwen2.5-VL's M-RoPE: rotary frequency j takes its position
    from the temporal, height or width row of `positions_3bt` [3, B, T] by the section it falls
    in (`section`, e.g. (16, 24, 24) for head_dim 128), then the rotate-half layout as 1-D RoPE.
    Text has three equal rows, so on text this is exactly `rope_cos_sin`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    axis_of = np.repeat(np.arange(len(section)), section)                  # [H/2]
    pos_bth = jnp.moveaxis(positions_3bt.astype(jnp.float32), 0, -1)[..., axis_of]
    freqs = pos_bth * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    half = x_btnh.shape[-1] // 2
    x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x_btnh * cos + rotated * sin).astype(x_btnh.dtype)


# -------------------------------------------------------------------------------- attention
def dense_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, *,
                    causal: bool, kv_valid_bs: jax.Array | None = None) -> jax.Array:
    """Grouped-query softmax attention in float32; the reference every SP strategy must equal.

    Causality is by index (query t sees keys s <= t); `kv_valid_bs` masks padded keys.
    """
    b, t, n, h = q_btnh.shape
    s, kh = k_bskh.shape[1], k_bskh.shape[2]
    g = n // kh
    q = q_btnh.reshape(b, t, kh, g, h).astype(jnp.float32)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_bskh.astype(jnp.float32)) / math.sqrt(h)
    mask = jnp.ones((b, t, s), dtype=bool)
    if causal:
        mask = mask & (jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None])
    if kv_valid_bs is not None:
        mask = mask & kv_valid_bs[:, None, :].astype(bool)
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    # A query with no valid key (a padded query) gets zeros, not a uniform average.
    probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_bskh.astype(jnp.float32))
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)
