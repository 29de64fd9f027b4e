"""The `mlp_downsample_2x2_fix` projector of VILA / LongVILA.

Each 2x2 block of neighbouring patches (row-major: top-left, top-right, bottom-left,
bottom-right) is concatenated into one 4*Dv vector (an odd grid is zero-padded at its bottom and
right edge), then LayerNorm(4*Dv) -> Linear(4*Dv, D) -> GELU (exact) -> Linear(D, D).
A 32x32 patch grid becomes 256 tokens per frame.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longrl_jax.models.config import ProjectorConfig
from longrl_jax.models.layers import Einsum, LayerNorm


def merge_2x2(x_fnd: jax.Array) -> jax.Array:
    """[F, g*g, Dv] -> [F, ceil(g/2)^2, 4*Dv], 2x2 blocks concatenated in row-major order."""
    f, n, dv = x_fnd.shape
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"the patch count {n} is not a square grid")
    x = x_fnd.reshape(f, g, g, dv)
    if g % 2:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        g += 1
    x = x.reshape(f, g // 2, 2, g // 2, 2, dv)  # [F, row2, a, col2, b, Dv]
    x = x.transpose(0, 1, 3, 2, 4, 5)             # [F, row2, col2, a, b, Dv]
    return x.reshape(f, (g // 2) ** 2, 4 * dv)


class Projector(nnx.Module):

    def __init__(self, cfg: ProjectorConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        dv4, d = 4 * cfg.vision_hidden_size, cfg.llm_hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm = LayerNorm(dv4, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.linear_1 = Einsum("FPE,ED->FPD", (dv4, d), ("vision_merged", "embed"),
                               bias_axes=("embed",), **kw)
        self.linear_2 = Einsum("FPD,DE->FPE", (d, d), ("embed_in", "embed"),
                               bias_axes=("embed",), **kw)

    def __call__(self, x_fnd: jax.Array) -> jax.Array:
        h = self.linear_1(self.layer_norm(merge_2x2(x_fnd)))
        return self.linear_2(jax.nn.gelu(h, approximate=False))
