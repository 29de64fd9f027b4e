"""SigLIP vision tower in Flax NNX: patch embedding, learned positions, pre-LN encoder layers,
post-layernorm, and the optional attention-pooling head.

Frames come channels-last, `[F, H, W, C]` (torch's channels-first `[F, C, H, W]` pixel_values
are accepted too), already normalised (mean/std 0.5). The patch
"convolution" is a reshape plus one einsum: the stride equals the kernel, so they are the same op.
`FramePreprocess` is SigLIP's image processor as a jnp function, so uint8 frames at their native
size can cross to the device and be resized and normalised inside the stage-1 computation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from longrl_jax.models.config import VisionConfig
from longrl_jax.models.image_resize import resize_bicubic
from longrl_jax.models.layers import (
    Einsum,
    LayerNorm,
    default_kernel_init,
    dense_attention,
    param,
    zeros,
)

MEAN = 0.5
STD = 0.5


@dataclasses.dataclass(frozen=True)
class FramePreprocess:
    """SigLIP's processor (as LongVILA uses it): bicubic resize to `size` x `size` (Pillow's,
    bit for bit), rescale by 1/255, normalise with mean/std 0.5. uint8 [F, H, W, 3] at any size
    -> float32 [F, size, size, 3]; the same values as `data.frames.load_frames`. A frozen
    dataclass so that compiled encoders can be cached by it (another family brings its own)."""

    size: int

    def __call__(self, frames_fhwc: jax.Array) -> jax.Array:
        if frames_fhwc.dtype != jnp.uint8 or frames_fhwc.ndim != 4 or frames_fhwc.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames_fhwc.dtype} "
                             f"{frames_fhwc.shape}")
        x = resize_bicubic(frames_fhwc, self.size, self.size)
        return (x.astype(jnp.float32) / 255.0 - MEAN) / STD


class SiglipEmbeddings(nnx.Module):

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.cfg = cfg
        self.dtype = dtype
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_kernel = param(rngs, default_kernel_init, (p, p, c, d),
                                  (None, None, None, "vision_embed"), param_dtype)
        self.patch_bias = param(None, zeros, (d,), ("vision_embed",), param_dtype)
        self.position_embedding = param(rngs, default_kernel_init, (cfg.num_patches, d),
                                        (None, "vision_embed"), param_dtype)

    def __call__(self, frames_fhwc: jax.Array) -> jax.Array:
        frames_fhwc = jnp.asarray(frames_fhwc)
        size, ch = self.cfg.image_size, self.cfg.num_channels
        if frames_fhwc.ndim == 4 and frames_fhwc.shape[1:] == (ch, size, size):
            frames_fhwc = frames_fhwc.transpose(0, 2, 3, 1)  # torch's [F, C, H, W] pixel_values
        f, h, w, c = frames_fhwc.shape
        p, g = self.cfg.patch_size, self.cfg.grid
        if (h, w, c) != (size, size, ch):
            raise ValueError(f"frames must be [F, {size}, {size}, {ch}] (or [F, {ch}, {size}, "
                             f"{size}]), got {frames_fhwc.shape}")
        x = frames_fhwc.astype(self.dtype).reshape(f, g, p, g, p, c)
        x = jnp.einsum("FgphqC,pqCD->FghD", x, self.patch_kernel[...].astype(self.dtype))
        x_fnd = x.reshape(f, g * g, -1) + self.patch_bias[...].astype(self.dtype)
        return x_fnd + self.position_embedding[...].astype(self.dtype)[None]


class SiglipAttention(nnx.Module):

    def __init__(self, d: int, n: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        h = d // n
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        axes = ("vision_embed", "vision_heads", "head_dim")
        self.q_proj = Einsum("BTD,DNH->BTNH", (d, n, h), axes, bias_axes=axes[1:], **kw)
        self.k_proj = Einsum("BSD,DNH->BSNH", (d, n, h), axes, bias_axes=axes[1:], **kw)
        self.v_proj = Einsum("BSD,DNH->BSNH", (d, n, h), axes, bias_axes=axes[1:], **kw)
        self.out_proj = Einsum("BTNH,NHD->BTD", (n, h, d), ("vision_heads", "head_dim",
                                                            "vision_embed"),
                               bias_axes=("vision_embed",), **kw)

    def __call__(self, x_btd: jax.Array, kv_btd: jax.Array | None = None) -> jax.Array:
        kv_btd = x_btd if kv_btd is None else kv_btd
        out = dense_attention(self.q_proj(x_btd), self.k_proj(kv_btd), self.v_proj(kv_btd),
                              causal=False)
        return self.out_proj(out)


class SiglipMLP(nnx.Module):

    def __init__(self, d: int, f: int, act: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.approximate = act == "gelu_pytorch_tanh"
        self.fc1 = Einsum("BTD,DF->BTF", (d, f), ("vision_embed", "vision_mlp"),
                          bias_axes=("vision_mlp",), **kw)
        self.fc2 = Einsum("BTF,FD->BTD", (f, d), ("vision_mlp", "vision_embed"),
                          bias_axes=("vision_embed",), **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate))


class SiglipEncoderLayer(nnx.Module):

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.self_attn = SiglipAttention(d, cfg.num_heads, **kw)
        self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = SiglipMLP(d, cfg.intermediate_size, cfg.hidden_act, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipPoolingHead(nnx.Module):
    """Multihead attention pooling with a learned probe (transformers' `vision_model.head`)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.probe = param(rngs, default_kernel_init, (1, 1, d), (None, None, "vision_embed"),
                           param_dtype)
        self.attention = SiglipAttention(d, cfg.num_heads, **kw)
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = SiglipMLP(d, cfg.intermediate_size, cfg.hidden_act, **kw)

    def __call__(self, x_fnd):
        probe = jnp.broadcast_to(self.probe[...].astype(x_fnd.dtype), (x_fnd.shape[0], 1,
                                                                        x_fnd.shape[-1]))
        h = self.attention(probe, x_fnd)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionModel(nnx.Module):
    """`hidden_states(frames)` returns the L+1 states transformers returns (embeddings, then each
    layer's output); `features(frames)` returns the one `select_layer` names, computing no layer
    past it; `__call__` returns (last_hidden_state after post_layernorm, pooled or None)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = SiglipEmbeddings(cfg, **kw)
        self.layers = nnx.List([SiglipEncoderLayer(cfg, **kw) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps,
                                        param_dtype=param_dtype)
        self.head = SiglipPoolingHead(cfg, **kw) if cfg.use_head else None

    def hidden_states(self, frames_fhwc: jax.Array, upto: int | None = None) -> list[jax.Array]:
        upto = self.cfg.num_layers if upto is None else upto
        states = [self.embeddings(frames_fhwc)]
        for layer in self.layers[:upto]:
            states.append(layer(states[-1]))
        return states

    def features(self, frames_fhwc: jax.Array) -> jax.Array:
        idx = self.cfg.select_layer % (self.cfg.num_layers + 1)
        return self.hidden_states(frames_fhwc, upto=idx)[idx]

    def __call__(self, frames_fhwc: jax.Array):
        last = self.post_layernorm(self.hidden_states(frames_fhwc)[-1])
        pooled = self.head(last) if self.head is not None else None
        return last, pooled

