"""MR-SP stage 2: log-probs of the response tokens only, with the sequence sharded.

The LM head and log-softmax run on the [B, R, D] hidden states of the positions that predict
response tokens, pulled from the sequence shards that hold them, never on the [B, T, V] logits
of a sequence that is mostly video. One front door, `batch_logprobs`, for a placed
`batch.SequenceBatch` (`batch.place_batch`, in the layout the installed attention was told):
the trainers, the benches and the tests all go through it. `full_logprobs` is the unsharded
reference the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longrl_jax.models.qwen2 import Qwen2ForCausalLM, token_logprobs
from longrl_jax.models.splice import splice_embeddings
from longrl_jax.parallel.mesh import DEFAULT_RULES, activation_spec, logical_to_spec
from longrl_jax.parallel.sequence import gather_rows


def predicting_positions(response_positions_br: np.ndarray) -> np.ndarray:
    """Token t is predicted by the hidden state at t - 1."""
    pos = np.asarray(response_positions_br)
    if (pos < 1).any():
        raise ValueError("a response token cannot be the first token of the sequence")
    return pos - 1


def head_logprobs(llm: Qwen2ForCausalLM, h_brd, targets_br, chunk: int = 128):
    """LM head + log-softmax over R rows, `chunk` rows at a time and rematerialised, so the
    [B, R, V] float32 logits never exist at once (V is 152k for Qwen2)."""
    b, r, d = h_brd.shape
    chunk = min(chunk, r)
    pad = -r % chunk
    h = jnp.pad(h_brd, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(jnp.asarray(targets_br), ((0, 0), (0, pad)))
    hs = h.reshape(b, -1, chunk, d).swapaxes(0, 1)
    ts = t.reshape(b, -1, chunk).swapaxes(0, 1)
    one = jax.checkpoint(lambda xs: token_logprobs(llm.logits(xs[0]), xs[1]))
    logp, ent = jax.lax.map(one, (hs, ts))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, -1)[:, :r]  # noqa: E731
    return unchunk(logp), unchunk(ent)


def full_logprobs(llm: Qwen2ForCausalLM, embeds_btd, response_positions_br, targets_br,
                  positions_bt=None, attention_mask_bt=None):
    """The unsharded reference: full logits, then the response positions."""
    logits = llm(inputs_embeds_btd=embeds_btd, positions_bt=positions_bt,
                 attention_mask_bt=attention_mask_bt)
    rows = jnp.asarray(predicting_positions(response_positions_br))
    picked = jnp.take_along_axis(logits, rows[..., None], axis=1)
    return token_logprobs(picked, jnp.asarray(targets_br))


def embed_inputs(model, b: dict, *, mesh, rules=DEFAULT_RULES) -> jax.Array:
    """Input embeddings [B, T, D] of a placed batch, sharded by the `activation_*` rules (T over
    'sequence'): the text embedding lookup, then each device splices its own shard of the split
    video table (`batch.in_layout`) at its own positions. No device sees another shard's video
    rows, and nothing of size [B, T, D] is gathered."""
    ids = b["token_ids"]
    seq = "sequence" if mesh.shape["sequence"] > 1 else None
    act = activation_spec(mesh, ids.shape + (model.llm.cfg.hidden_size,), rules)
    act = P(*act, *([None] * (3 - len(act))))
    if act[1] != seq:
        raise ValueError(f"activation_length must follow the batch's sequence axis ({seq}), "
                         f"the rules give {act[1]}")
    # The lookup reads the embedding table whole along D (vocab stays split): a gather from a
    # D-sharded table would come out D-sharded and be resharded to T at full length.
    emb = model.llm.embed_tokens
    table = emb.embedding[...].astype(emb.dtype)
    table = jax.lax.with_sharding_constraint(
        table, NamedSharding(mesh, logical_to_spec(("vocab", None), table.shape, mesh, rules)))
    text = jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0),
                                            NamedSharding(mesh, act))

    def local(text, rows, table):
        table = table[0]
        if table.dtype == jnp.uint16:       # a 16-bit float table's bits (`batch.table_bits`)
            if text.dtype.itemsize != 2:
                raise ValueError(f"a 16-bit video table for a {text.dtype} model")
            bits = splice_embeddings(jax.lax.bitcast_convert_type(text, jnp.uint16), table,
                                     rows, xp=jnp)
            return jax.lax.bitcast_convert_type(bits, text.dtype)
        return splice_embeddings(text, table.astype(text.dtype), rows, xp=jnp)

    return jax.shard_map(local, mesh=mesh, in_specs=(act, P(act[0], seq), P(seq)),
                         out_specs=act, check_vma=False)(text, b["video_rows"],
                                                         model.video_table(b["video_table"]))


def batch_logprobs(model, b: dict, *, mesh, rules=DEFAULT_RULES) -> tuple[jax.Array, jax.Array]:
    """(log p, entropy) [B, R] of the response tokens of a placed `SequenceBatch` (`b`, from
    `batch.place_batch`, T in the installed attention's layout; `b["rows"]` are layout
    positions); runs inside jit."""
    x = embed_inputs(model, b, mesh=mesh, rules=rules)
    sp = mesh.shape["sequence"]
    h = model.llm.hidden_states(inputs_embeds_btd=x, positions_bt=b["positions"],
                                attention_mask_bt=b["valid"])
    if sp > 1:
        h_r = gather_rows(h, b["rows"], mesh=mesh)
    else:
        h_r = jnp.take_along_axis(h, b["rows"][..., None], axis=1)
    return head_logprobs(model.llm, h_r, b["targets"])


__all__ = ["batch_logprobs", "embed_inputs", "full_logprobs", "head_logprobs", "predicting_positions"]
