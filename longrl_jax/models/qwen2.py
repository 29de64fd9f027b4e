"""Qwen2 decoder in Flax NNX: GQA with q/k/v bias, rotate-half RoPE, RMSNorm, SwiGLU MLP.

Attention is pluggable (`attn_fn`, `set_attention`) so the blockwise kernel and the MR-SP
sequence-parallel strategies can replace the dense reference without touching the layer code. Inputs are token ids or already spliced embeddings
(a video placed at its placeholder), so rollout and training use the identical sequence.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from longrl_jax.models.config import LLMConfig
from longrl_jax.models.layers import (
    Einsum,
    Embed,
    RMSNorm,
    apply_rope,
    dense_attention,
    mrope_cos_sin,
    rope_cos_sin,
)

# attn_fn(q [B,T,N,H], k [B,S,K,H], v [B,S,K,H], *, causal, kv_valid_bs) -> [B,T,N,H]
AttnFn = Callable[..., jax.Array]
LAYER_INPUT = "layer_input"   # the name a rematerialised layer's saved input goes by


class Qwen2Attention(nnx.Module):

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"),
                             bias_axes=("heads", "head_dim"), **kw)
        self.k_proj = Einsum("BSD,DKH->BSKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                             bias_axes=("kv_heads", "head_dim"), **kw)
        self.v_proj = Einsum("BSD,DKH->BSKH", (d, k, h), ("embed", "kv_heads", "head_dim"),
                             bias_axes=("kv_heads", "head_dim"), **kw)
        self.o_proj = Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), **kw)

    def __call__(self, x_btd, cos_bth, sin_bth, kv_valid_bs, attn_fn: AttnFn):
        q_btnh = apply_rope(self.q_proj(x_btd), cos_bth, sin_bth)
        k_bskh = apply_rope(self.k_proj(x_btd), cos_bth, sin_bth)
        v_bskh = self.v_proj(x_btd)
        out_btnh = attn_fn(q_btnh, k_bskh, v_bskh, causal=True, kv_valid_bs=kv_valid_bs)
        return self.o_proj(out_btnh)


class Qwen2MLP(nnx.Module):

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **kw)
        self.up_proj = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), **kw)
        self.down_proj = Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), **kw)

    def __call__(self, x_btd, chunks: tuple[int, int] | None = None):
        """`chunks` = (S, n): T (S equal shards, the sequence axis) is processed n pieces per
        shard at a time, each rematerialised, so the [T, F] intermediates (F ~ 5 D) of a long
        sequence exist one piece at a time, forward and backward. Per-token: same result."""
        if chunks is None or chunks[1] == 1:
            return self._mlp(x_btd)
        s, n = chunks
        b, t, d = x_btd.shape
        c = t // (s * n)
        x_nbscd = jnp.moveaxis(x_btd.reshape(b, s, n, c, d), 2, 0)

        def piece(x_bscd):      # the piece of every shard, [B, S * c, D] with S split
            return self._mlp(x_bscd.reshape(b, s * c, d)).reshape(b, s, c, d)
        y = jax.lax.map(jax.checkpoint(piece), x_nbscd)
        return jnp.moveaxis(y, 0, 2).reshape(b, t, d)

    def _mlp(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp_chunks(t: int, shards: int, chunk: int) -> tuple[int, int] | None:
    """(shards, n) for `Qwen2MLP`: the fewest pieces per shard of at most ~`chunk` tokens that
    divide the shard's T / shards tokens evenly (None: no chunking)."""
    if chunk <= 0 or t % shards:
        return None
    local = t // shards
    n = -(-local // chunk)
    while local % n:
        n += 1
    return (shards, n) if n > 1 else None


class Qwen2Block(nnx.Module):

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Qwen2Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                param_dtype=param_dtype)
        self.mlp = Qwen2MLP(cfg, **kw)

    def __call__(self, x_btd, cos_bth, sin_bth, kv_valid_bs, attn_fn: AttnFn,
                 mlp_chunks: tuple[int, int] | None = None):
        x_btd = x_btd + self.self_attn(self.input_layernorm(x_btd), cos_bth, sin_bth, kv_valid_bs,
                                       attn_fn)
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd), mlp_chunks)


class Qwen2ForCausalLM(nnx.Module):
    """`model(input_ids) -> logits [B, T, V]`; `hidden_states(...)` and `logits(...)` split the
    two halves so response-only log-probs never project the whole sequence onto the vocabulary."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, scan_layers: bool = False):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        if scan_layers:
            # One Qwen2Block whose every parameter has a leading [num_layers] axis.
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return Qwen2Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([Qwen2Block(cfg, **kw) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Einsum("BTD,DV->BTV", (cfg.hidden_size, cfg.vocab_size),
                                  ("embed", "vocab"), **kw)
        self.attn_fn: AttnFn = dense_attention
        self.act_sharding = None
        self.remat_offload = False   # see `remat_policy`
        self.mlp_chunk = 0           # tokens per MLP piece (0: whole), see `Qwen2MLP`
        self.seq_shards = 1          # the sequence axis T is split over (set with SP)

    def set_attention(self, attn_fn: AttnFn, act_sharding=None) -> None:
        """Replaces the attention kernel (the build step installs flash or MR-SP's strategies;
        see `build.install_attention`). `act_sharding` constrains the activations between
        layers (sequence parallelism keeps them T-sharded: GSPMD then gathers weights, not
        tokens)."""
        self.attn_fn = attn_fn
        self.act_sharding = act_sharding

    def remat_policy(self):
        """What a rematerialised layer keeps for the backward pass: its input only, on the
        device; with `remat_offload` that input goes to the host's pinned memory instead (and
        comes back for the layer's backward), so the saved inputs of all layers, the largest
        term of a long sequence, leave the device."""
        if not self.remat_offload:
            return None
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,),
            offload_src="device", offload_dst="pinned_host")

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        return self.embed_tokens(jnp.asarray(input_ids_bt))

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin [B, T, H] from positions [B, T], or [3, B, T] (temporal, height, width) for an
        M-RoPE model (`cfg.mrope_section`; see `models/positions.py`); [B, T] positions on an
        M-RoPE model are text positions (all three rows equal)."""
        c = self.cfg
        if c.mrope_section is None:
            if positions.ndim != 2:
                raise ValueError(f"positions must be [B, T] for 1-D RoPE, got {positions.shape}")
            return rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling_factor)
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
        if positions.ndim != 3 or positions.shape[0] != 3:
            raise ValueError(f"M-RoPE positions must be [3, B, T], got {positions.shape}")
        return mrope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)

    def hidden_states(self, input_ids_bt: jax.Array | None = None, *,
                      inputs_embeds_btd: jax.Array | None = None,
                      positions_bt: jax.Array | None = None,
                      attention_mask_bt: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, T, D]."""
        if (input_ids_bt is None) == (inputs_embeds_btd is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x_btd = self.embed(input_ids_bt) if inputs_embeds_btd is None else inputs_embeds_btd
        x_btd = x_btd.astype(self.dtype)
        b, t = x_btd.shape[:2]
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = self.rope(jnp.asarray(positions_bt))
        cos, sin = cos.astype(self.dtype), sin.astype(self.dtype)
        attn_fn = self.attn_fn
        constrain = (lambda x: jax.lax.with_sharding_constraint(x, self.act_sharding)) \
            if self.act_sharding is not None else (lambda x: x)
        x_btd = constrain(x_btd)
        chunks = mlp_chunks(t, self.seq_shards, self.mlp_chunk)
        if self.scan_layers:
            x_btd = self._scan_layers(x_btd, cos, sin, attention_mask_bt, attn_fn, constrain,
                                      chunks)
        else:
            def block(layer, x_btd, cos, sin, mask_bt):
                x_btd = checkpoint_name(x_btd, LAYER_INPUT)
                return layer(x_btd, cos, sin, mask_bt, attn_fn, chunks)

            if self.remat:
                block = nnx.remat(block, policy=self.remat_policy())
            for layer in self.layers:
                x_btd = constrain(block(layer, x_btd, cos, sin, attention_mask_bt))
        return self.norm(x_btd)

    def _scan_layers(self, x_btd, cos, sin, mask_bt, attn_fn, constrain, chunks):
        """The layers as one `lax.scan` over their stacked parameters, rematerialised per layer:
        one compiled layer whatever the depth, and a backward pass that keeps only each layer's
        input (the recomputation sits in a separate loop, where no pass can fold it back into
        the forward, as XLA:CPU does with unrolled remat)."""
        graphdef, stacked = nnx.split(self.layers)

        def body(x_btd, state):
            layer = nnx.merge(graphdef, state)
            x_btd = checkpoint_name(x_btd, LAYER_INPUT)
            return constrain(layer(x_btd, cos, sin, mask_bt, attn_fn, chunks)), None

        if self.remat:
            body = jax.checkpoint(body, policy=self.remat_policy())
        x_btd, _ = jax.lax.scan(body, x_btd, stacked)
        return x_btd

    def logits(self, h_btd: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.embed_tokens.attend(h_btd)
        return self.lm_head(h_btd)

    def __call__(self, input_ids_bt: jax.Array | None = None, *,
                 inputs_embeds_btd: jax.Array | None = None,
                 positions_bt: jax.Array | None = None,
                 attention_mask_bt: jax.Array | None = None) -> jax.Array:
        h = self.hidden_states(input_ids_bt, inputs_embeds_btd=inputs_embeds_btd,
                               positions_bt=positions_bt, attention_mask_bt=attention_mask_bt)
        return self.logits(h)


def token_logprobs(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy) from logits, in float32."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0], entropy
