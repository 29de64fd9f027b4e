"""Prompt + video + response sequences, identical for rollout and training.

One `Prompt` per question: its chat-templated ids, its `SpliceLayout` (the video rows spliced at
the placeholder, one separator per frame) and the key of its video embedding. The rollout server
receives `layout.segments()` with the video referenced by key; the trainer builds the same
sequence here, appends the response, and takes log-probs of the response tokens only. Nothing
about the video's position differs between the two (Long-RL's defect).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longrl_jax.data.longvideo_reason import VIDEO_TOKEN, Example
from longrl_jax.models.splice import SpliceLayout, splice_layout
from longrl_jax.parallel.prefill import head_logprobs
from longrl_jax.parallel.sequence import gather_rows


@dataclasses.dataclass(frozen=True)
class Tokens:
    """The token ids a run needs from its tokenizer."""
    video: int
    separator: int
    stop: tuple[int, ...]          # ids that end a response (<|im_end|>, <|endoftext|>)

    @classmethod
    def of(cls, tokenizer) -> "Tokens":
        video = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        sep = tokenizer.encode("\n", add_special_tokens=False)
        if len(sep) != 1:
            raise ValueError(f"the tokenizer splits the frame separator '\\n' into {sep}")
        stop = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
                     if t in tokenizer.get_vocab())
        return cls(video=int(video), separator=int(sep[0]), stop=stop)


@dataclasses.dataclass
class Prompt:
    example: Example
    ids: np.ndarray             # chat-templated prompt ids, one video placeholder
    layout: SpliceLayout        # the prompt with the video's rows spliced in
    video_key: str              # names the embedding on the server and in the cache
    video: np.ndarray           # [F * tokens_per_frame, D] video rows


def prompt_ids(tokenizer, example: Example, thinking: bool = True) -> np.ndarray:
    ids = tokenizer.apply_chat_template(example.messages(thinking), add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return np.asarray(ids, np.int32)


def make_prompt(tokenizer, tokens: Tokens, example: Example, video_rows_fpd: np.ndarray,
                video_key: str, *, thinking: bool = True) -> Prompt:
    ids = prompt_ids(tokenizer, example, thinking)
    f, tpf, d = video_rows_fpd.shape
    layout = splice_layout(ids, video_token_id=tokens.video, frames_per_video=[f],
                           tokens_per_frame=tpf, separator_id=tokens.separator)
    return Prompt(example, ids, layout, video_key, video_rows_fpd.reshape(f * tpf, d))


def response_ids(tokenizer, text: str, tokens: Tokens) -> np.ndarray:
    """A target completion as ids, ending with the stop token (what the policy must emit)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(list(ids) + [tokens.stop[0]], np.int32)


# ------------------------------------------------------------------------------------------------
# Host-side batch
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SequenceBatch:
    token_ids: np.ndarray       # [B, T] text ids (0 at video rows and padding)
    video_rows: np.ndarray      # [B, T] row of `video_table`, -1 for text
    video_table: np.ndarray     # [N, D] the batch's video rows, concatenated
    positions: np.ndarray       # [B, T]
    valid: np.ndarray           # [B, T] False at padding
    rows: np.ndarray            # [B, R] position whose hidden state predicts response token r
    targets: np.ndarray         # [B, R] response tokens
    mask: np.ndarray            # [B, R] 1.0 for real response tokens

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def _round_up(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def build_batch(prompts: Sequence[Prompt], responses: Sequence[np.ndarray], *,
                length_multiple: int = 64, response_len: int | None = None,
                table_multiple: int = 256) -> SequenceBatch:
    """One row per (prompt, response) pair; prompts repeat for the G samples of a group (their
    video rows are stored once per distinct key)."""
    if len(prompts) != len(responses):
        raise ValueError("one response per prompt")
    b = len(prompts)
    lengths = [p.layout.length + len(r) for p, r in zip(prompts, responses)]
    t = _round_up(max(lengths), length_multiple)
    r_len = response_len or _round_up(max(len(r) for r in responses), 8)
    if max(len(r) for r in responses) > r_len:
        raise ValueError(f"a response has {max(len(r) for r in responses)} tokens > {r_len}")
    offsets, tables, n = {}, [], 0
    for p in prompts:
        if p.video_key not in offsets:
            offsets[p.video_key] = n
            tables.append(p.video)
            n += p.video.shape[0]
    d = tables[0].shape[1]
    table = np.zeros((_round_up(n, table_multiple), d), np.float32)
    table[:n] = np.concatenate(tables)
    tok = np.zeros((b, t), np.int32)
    vrows = np.full((b, t), -1, np.int32)
    valid = np.zeros((b, t), bool)
    rows = np.zeros((b, r_len), np.int32)
    targets = np.zeros((b, r_len), np.int32)
    mask = np.zeros((b, r_len), np.float32)
    for i, (p, resp) in enumerate(zip(prompts, responses)):
        lp, lr = p.layout.length, len(resp)
        tok[i, :lp] = p.layout.token_ids
        tok[i, lp:lp + lr] = resp
        vr = p.layout.video_rows
        vrows[i, :lp] = np.where(vr >= 0, vr + offsets[p.video_key], -1)
        valid[i, :lp + lr] = True
        rows[i, :lr] = np.arange(lp - 1, lp + lr - 1)
        targets[i, :lr] = resp
        mask[i, :lr] = 1.0
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return SequenceBatch(tok, vrows, table, positions, valid, rows, targets, mask)


# ------------------------------------------------------------------------------------------------
# Device side: response log-probs (MR-SP stage 2 when the mesh has a 'sequence' axis)
# ------------------------------------------------------------------------------------------------

def batch_axes(mesh, b: int) -> tuple[str, ...] | None:
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    return axes if axes and b % size == 0 else None


def place_batch(batch: SequenceBatch, mesh) -> dict[str, jax.Array]:
    """Batch rows over data x fsdp; the sequence dimension over 'sequence'."""
    sp = mesh.shape["sequence"]
    b = batch.token_ids.shape[0]
    bax = batch_axes(mesh, b)
    seq = "sequence" if sp > 1 else None
    out = {}
    for name, a in batch.arrays().items():
        if name == "video_table":
            spec = P()
        elif name in ("token_ids", "video_rows", "positions", "valid"):
            spec = P(bax, seq)
        else:
            spec = P(bax, None)
        out[name] = jax.device_put(a, NamedSharding(mesh, spec))
    return out


def response_logprobs(model, b: dict, *, mesh) -> tuple[jax.Array, jax.Array]:
    """(log p, entropy) [B, R] of the response tokens; runs inside jit."""
    x = model.splice(b["token_ids"], b["video_rows"], b["video_table"])
    sp = mesh.shape["sequence"]
    if sp > 1:
        bax = batch_axes(mesh, x.shape[0])
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(bax, "sequence", None)))
    h = model.llm.hidden_states(inputs_embeds_btd=x, positions_bt=b["positions"],
                                attention_mask_bt=b["valid"])
    if sp > 1:
        h_r = gather_rows(h, b["rows"], mesh=mesh)
    else:
        h_r = jnp.take_along_axis(h, b["rows"][..., None], axis=1)
    return head_logprobs(model.llm, h_r, b["targets"])
