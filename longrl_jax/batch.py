"""Host batches of (prompt + video + response) sequences, and their placement on the mesh.

The same `SequenceBatch` feeds the SFT step, the old-policy and reference log-prob passes and the
policy update: rows are whole sequences, the video rows are stored once per distinct video in
`video_table` and spliced on the device (`VLM.splice`) at the rows the prompt's layout names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longrl_jax.parallel import mesh as mesh_lib
from longrl_jax.parallel import sequence
from longrl_jax.prompts import Prompt


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
        """The fields by name, not copied (`dataclasses.asdict` would deep-copy the video table
        on every call)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def row_arrays(self) -> dict[str, np.ndarray]:
        """The per-sequence fields (everything but the shared video table)."""
        return {k: v for k, v in self.arrays().items() if k != "video_table"}

    def take(self, idx: np.ndarray) -> "SequenceBatch":
        """The sequences `idx` (a mini-batch); the video table is shared, not copied."""
        per_row = {k: v[idx] for k, v in self.row_arrays().items()}
        return SequenceBatch(video_table=self.video_table, **per_row)


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


_SEQUENCE_FIELDS = ("token_ids", "video_rows", "positions", "valid")


def sequence_layout(mesh, layout: str) -> str:
    """The layout T is placed in on `mesh`: `layout` with a 'sequence' axis, else contiguous
    (without sequence parallelism the order does not matter, and nothing is reordered)."""
    if layout not in sequence.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sequence.LAYOUTS}")
    return layout if mesh.shape["sequence"] > 1 else "contiguous"


def length_multiple(mesh, layout: str, floor: int = 64) -> int:
    """The `build_batch` length multiple for placing on `mesh` in `layout`: a multiple of
    `floor` that the layout's split of T over the 'sequence' axis divides (2*sp for zigzag)."""
    sp = mesh.shape["sequence"]
    return math.lcm(floor, sequence.layout_multiple(sp, sequence_layout(mesh, layout)))


def in_layout(batch: SequenceBatch, mesh, layout: str) -> SequenceBatch:
    """The batch with T in `layout` order for `mesh`, ready to be placed.

    With a 'sequence' axis, T is put in `layout` order (`sequence.layout_index`; 'zigzag' gives
    device i the chunks i and 2sp-1-i, balancing causal attention), which must be the layout the
    installed attention was told (`build.install_attention`: `config.sp.layout`). The per-token
    fields move together, so positions keep their original values (RoPE) and padding stays
    invalid; `rows` are mapped to the layout positions of the hidden states they name, where
    `sequence.gather_rows` finds them. T must be a multiple of the layout's split (see
    `length_multiple`). Without a 'sequence' axis the layout does not matter: nothing moves."""
    sp = mesh.shape["sequence"]
    layout = sequence_layout(mesh, layout)
    index = sequence.layout_index(batch.token_ids.shape[1], sp, layout)  # validates T
    if layout == "contiguous":
        return batch
    arrays = batch.arrays()
    for name in _SEQUENCE_FIELDS:
        arrays[name] = arrays[name][:, index]
    arrays["rows"] = sequence.inverse_index(index)[arrays["rows"]]
    return SequenceBatch(**arrays)


def place_batch(batch: SequenceBatch, mesh, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES,
                layout: str = "contiguous") -> dict[str, jax.Array]:
    """The batch in `layout` order (`in_layout`) on the mesh: rows over the 'batch' rule's mesh
    axes, the sequence dimension over 'sequence', the video table replicated."""
    batch = in_layout(batch, mesh, layout)
    return dict(place_rows(batch.row_arrays(), mesh, rules),
                video_table=place_table(batch.video_table, mesh))


def place_table(table: np.ndarray, mesh) -> jax.Array:
    """The batch's video rows, replicated (the splice gathers any row on any device)."""
    return jax.device_put(table, NamedSharding(mesh, P()))


def row_sharding(mesh, name: str, shape, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES, *,
                 stacked: bool = False) -> NamedSharding:
    """Where a per-row field [B, ...] (or [n, B, ...] micro-batches when `stacked`) goes:
    rows over the 'batch' rule's axes, a sequence field's T over 'sequence'."""
    seq = "sequence" if mesh.shape["sequence"] > 1 else None
    lead = (None,) if stacked else ()
    bax = mesh_lib.batch_axes(mesh, shape[len(lead)], rules)
    spec = (*lead, bax, seq if name in _SEQUENCE_FIELDS else None)[:len(shape)]
    return NamedSharding(mesh, P(*spec))


def place_rows(arrays: dict[str, np.ndarray], mesh,
               rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES, *, stacked: bool = False
               ) -> dict[str, jax.Array]:
    """Per-row arrays onto the mesh (`row_sharding`)."""
    return {name: jax.device_put(a, row_sharding(mesh, name, a.shape, rules, stacked=stacked))
            for name, a in arrays.items()}


def batch_shardings(mesh, batch_size: int, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
                    ) -> dict[str, NamedSharding]:
    """Where `place_batch` puts each field of a `SequenceBatch` of `batch_size` rows."""
    out = {"video_table": NamedSharding(mesh, P())}
    for f in dataclasses.fields(SequenceBatch):
        if f.name != "video_table":
            out[f.name] = row_sharding(mesh, f.name, (batch_size, 1), rules)
    return out


def place_micro_batches(rows: dict[str, np.ndarray], n: int, mesh,
                        rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES, *,
                        zero: tuple[str, ...] = ("mask",)) -> dict[str, jax.Array]:
    """Per-row host arrays as `n` micro-batches [n, ceil(B/n), ...] on the mesh."""
    return place_rows(stack_micro_batches(rows, n, zero=zero), mesh, rules, stacked=True)


def stack_micro_batches(arrays: dict[str, np.ndarray], n: int, *, zero: tuple[str, ...] = ()
                        ) -> dict[str, np.ndarray]:
    """Per-row host arrays [B, ...] -> [n, ceil(B/n), ...]. Rows added to fill the last
    micro-batch copy row 0 with the fields in `zero` (masks, advantages) set to 0, so they
    add nothing to a loss, a gradient or a metric."""
    b = next(iter(arrays.values())).shape[0]
    per = -(-b // n)
    pad = per * n - b
    out = {}
    for k, a in arrays.items():
        if pad:
            fill = np.zeros_like(a[:1]) if k in zero else a[:1]
            a = np.concatenate([a, np.repeat(fill, pad, axis=0)])
        out[k] = a.reshape((n, per) + a.shape[1:])
    return out
