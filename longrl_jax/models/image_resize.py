"""Pillow's bicubic resize, bit for bit, as a jnp computation (runs where the vision tower runs).

The original's processors (SigLIP's, Qwen2-VL's) resize uint8 frames with `PIL.Image.resize(...,
BICUBIC)`. Pillow's resampler is separable: a horizontal pass, then a vertical one, each a
weighted sum of a few input pixels with fixed-point weights (22 fractional bits), rounded and
clipped to uint8 between the passes. `jax.image.resize` is the same Keys cubic (a = -0.5) in
floating point with no intermediate rounding, so it differs by up to a few uint8 levels (see
bench/RESULTS.md); reproducing Pillow's integer arithmetic instead keeps embeddings computed from
device-resized frames identical to those of the host pipeline, so cached embeddings and parity
with transformers stay meaningful. The weights are computed on the host in float64 exactly as
Pillow's `precompute_coeffs` does (same operations, same order) and the passes are int32 sums,
exact on every backend. Pillow 13 runs the vertical pass first when the height shrinks by more
than twice as many pixels as the width (python-pillow/Pillow#9549); `vertical_first` follows the
installed Pillow, so the two paths agree whichever version the host pipeline uses.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math

import jax.numpy as jnp
import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
BICUBIC_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's `bicubic_filter` (a = -0.5), written in its operation order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [out, K] int32, weights [out, K] int32 in 2^-22 units) of Pillow's bicubic
    resampling of one axis from `in_size` to `out_size` pixels. Unused taps have weight 0 and
    index 0."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    idx = np.zeros((out_size, ksize), np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = np.array([_bicubic((x + xmin - center + 0.5) * (1.0 / filterscale))
                      for x in range(xmax)], np.float64)
        total = 0.0
        for v in w:  # Pillow sums in this order; np.sum would pair terms differently
            total += v
        if total != 0.0:
            w = w / total
        fixed = w * (1 << PRECISION_BITS)
        idx[xx, :xmax] = np.arange(xmin, xmin + xmax)
        weights[xx, :xmax] = np.where(fixed < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed))
    return idx, weights


@functools.lru_cache(maxsize=1)
def _pillow_major() -> int:
    try:
        return int(importlib.metadata.version("pillow").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


def vertical_first(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether Pillow (the installed version) resizes the height before the width."""
    dh, dw = in_hw[0] - out_hw[0], in_hw[1] - out_hw[1]
    return _pillow_major() >= 13 and dh > 0 and dh > 2 * dw


def _pass(x_int, axis: int, out_size: int):
    """One separable pass along `axis` of int32 pixels; returns int32 in [0, 255]."""
    idx, weights = bicubic_taps(x_int.shape[axis], out_size)
    shape = [1] * x_int.ndim
    shape[axis] = out_size
    acc = jnp.full((), 1 << (PRECISION_BITS - 1), jnp.int32)
    for k in range(idx.shape[1]):
        taken = jnp.take(x_int, jnp.asarray(idx[:, k]), axis=axis)
        acc = acc + taken * jnp.asarray(weights[:, k]).reshape(shape)
    return jnp.clip(jnp.right_shift(acc, PRECISION_BITS), 0, 255)


def resize_bicubic(frames_fhwc, height: int, width: int):
    """uint8 [..., H, W, C] -> uint8 [..., height, width, C], equal to Pillow's
    `Image.resize((width, height), Image.BICUBIC)` of each frame. Shapes are static, so the
    taps are constants of the compiled computation."""
    h, w = frames_fhwc.shape[-3:-1]
    x = jnp.asarray(frames_fhwc).astype(jnp.int32)
    passes = [(x.ndim - 2, width, w != width), (x.ndim - 3, height, h != height)]
    if vertical_first((h, w), (height, width)):
        passes.reverse()
    for axis, size, needed in passes:
        if needed:  # Pillow skips a pass whose size does not change
            x = _pass(x, axis, size)
    return x.astype(jnp.uint8)


__all__ = ["bicubic_taps", "resize_bicubic", "vertical_first"]
