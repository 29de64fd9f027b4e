"""Host batches of (prompt + video + response) sequences, and their placement on the mesh.

The same `SequenceBatch` feeds the SFT step, the old-policy and reference log-prob passes and the
policy update: rows are whole sequences, the video rows are stored once per distinct video in
`video_table` and spliced on the device at the positions the prompt's layout names.

Video rows are never replicated: `in_layout` splits the table by sequence shard (shard s holds
only the rows that its slice of T splices, whichever sequence of the batch they belong to), so a
device holds 1/sp of the batch's video rows, in the model's dtype (`place_table`), and the
splice is a local gather (`parallel.logprobs.embed_inputs`).
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
    video_table: np.ndarray     # [N, D] the batch's video rows, concatenated; [S, N_s, D] by
    #                             sequence shard after `in_layout` (video_rows then index a shard)
    positions: np.ndarray       # [B, T]
    valid: np.ndarray           # [B, T] False at padding
    rows: np.ndarray            # [B, R] position whose hidden state predicts response token r
    targets: np.ndarray         # [B, R] response tokens
    mask: np.ndarray            # [B, R] 1.0 for real response tokens
    table_index: np.ndarray | None = None   # [S, N_s] original row of each shard row (-1: none)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fields by name, not copied (`dataclasses.asdict` would deep-copy the video table
        on every call)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def row_arrays(self) -> dict[str, np.ndarray]:
        """The per-sequence fields (everything but the shared video table and its index)."""
        return {k: v for k, v in self.arrays().items() if k not in SHARED_FIELDS}

    @property
    def sharded(self) -> bool:
        return self.table_index is not None

    def take(self, idx: np.ndarray) -> "SequenceBatch":
        """The sequences `idx`, with only the video rows they use (for a batch in layout,
        re-split by shard: a mini-batch of whole groups carries only its own videos)."""
        per_row = {k: v[idx] for k, v in self.row_arrays().items()}
        if not self.sharded:
            return SequenceBatch(video_table=self.video_table, **per_row)
        sp = self.table_index.shape[0]
        out = SequenceBatch(**per_row, video_table=np.zeros((0, self.video_table.shape[-1]),
                                                            self.video_table.dtype))
        global_rows = original_video_rows(per_row["video_rows"], self.table_index)
        return _split_table(dataclasses.replace(out, video_rows=global_rows),
                            _ShardSource(self.video_table, self.table_index), sp)


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
SHARED_FIELDS = ("video_table", "table_index")


def table_rows(n: int) -> int:
    """Rows a shard table of `n` rows is padded to: steps of 1/16 to 1/32 of its size, so a
    step's table size (a compile key) takes few values as prompts vary, wasting < 6.25%."""
    step = 2 ** max(3, n.bit_length() - 5)
    return max(step, -(-n // step) * step)


class _ShardSource:
    """Rows of an already split table, addressed by original row (for `take`)."""

    def __init__(self, table_snd, index_sn):
        self.table = table_snd
        s, j = np.nonzero(index_sn >= 0)
        g = index_sn[s, j]
        self.shard = np.zeros(int(g.max()) + 1 if len(g) else 0, np.int64)
        self.slot = np.zeros_like(self.shard)
        self.shard[g], self.slot[g] = s, j     # a row used by two shards: either copy serves

    def __getitem__(self, rows):
        return self.table[self.shard[rows], self.slot[rows]]


def original_video_rows(video_rows_bt, index_sn):
    """Shard-local video rows (T in layout order, split in S equal slices) -> original rows."""
    b, t = video_rows_bt.shape
    sp = index_sn.shape[0]
    local = video_rows_bt.reshape(b, sp, t // sp)
    shard = np.arange(sp)[None, :, None]
    out = np.where(local >= 0, index_sn[shard, np.maximum(local, 0)], -1)
    return out.reshape(b, t).astype(np.int32)


def _split_table(batch: SequenceBatch, source, sp: int) -> SequenceBatch:
    """`batch` (T in layout order, `video_rows` original rows of `source`) with its table split
    by sequence shard: shard s holds the rows its slice of T uses, once each."""
    b, t = batch.video_rows.shape
    tl = t // sp
    per = batch.video_rows.reshape(b, sp, tl)
    used = [np.unique(per[:, s][per[:, s] >= 0]) for s in range(sp)]
    n_s = table_rows(max(len(u) for u in used))
    index = np.full((sp, n_s), -1, np.int32)
    local = np.full_like(per, -1)
    for s, u in enumerate(used):
        index[s, :len(u)] = u
        r = per[:, s]
        local[:, s] = np.where(r >= 0, np.searchsorted(u, np.maximum(r, 0)), -1)
    d = batch.video_table.shape[-1]
    table = np.zeros((sp, n_s, d), batch.video_table.dtype)
    for s, u in enumerate(used):
        if len(u):
            table[s, :len(u)] = source[u]
    return dataclasses.replace(batch, video_rows=local.reshape(b, t), video_table=table,
                               table_index=index)


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
    `length_multiple`). Without a 'sequence' axis the layout does not matter: nothing moves.

    The video table is then split by sequence shard ([S, N_s, D], `video_rows` indexing the
    shard of their position; `table_index` keeps each shard row's original row), so each device
    is sent only the rows its part of T splices."""
    if batch.sharded:
        raise ValueError("this batch is already in layout (in_layout was applied twice)")
    sp = mesh.shape["sequence"]
    layout = sequence_layout(mesh, layout)
    index = sequence.layout_index(batch.token_ids.shape[1], sp, layout)  # validates T
    if layout != "contiguous":
        arrays = batch.arrays()
        for name in _SEQUENCE_FIELDS:
            arrays[name] = arrays[name][:, index]
        arrays["rows"] = sequence.inverse_index(index)[arrays["rows"]]
        batch = SequenceBatch(**arrays)
    if sp == 1:
        n = batch.video_table.shape[0]
        return dataclasses.replace(batch, video_table=batch.video_table[None],
                                   table_index=np.arange(n, dtype=np.int32)[None])
    return _split_table(batch, batch.video_table, sp)


def place_batch(batch: SequenceBatch, mesh, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES,
                layout: str = "contiguous", dtype=None) -> dict[str, jax.Array]:
    """The batch in `layout` order (`in_layout`, unless it already is) on the mesh: rows over
    the 'batch' rule's mesh axes, the sequence dimension over 'sequence', the video table split
    by sequence shard (`place_table`)."""
    if not batch.sharded:
        batch = in_layout(batch, mesh, layout)
    return dict(place_rows(batch.row_arrays(), mesh, rules),
                video_table=place_table(batch.video_table, mesh, dtype))


def table_sharding(mesh, memory_kind: str | None = None) -> NamedSharding:
    """[S, N_s, D] video tables: shard s on the devices of sequence index s (replicated over
    the other axes, whose devices hold other rows of the same slice of T)."""
    spec = P("sequence") if mesh.shape["sequence"] > 1 else P()
    return NamedSharding(mesh, spec, memory_kind=memory_kind)


def place_table(table: np.ndarray, mesh, dtype=None, memory_kind: str | None = None
                ) -> jax.Array:
    """A split video table (`in_layout`) onto the mesh in `dtype` (the model's compute dtype:
    cast on the host, so only those bytes cross), each device receiving its shard only.
    16-bit floats travel as their uint16 bits (`table_bits`)."""
    if table.ndim != 3 or table.shape[0] != mesh.shape["sequence"]:
        raise ValueError(f"video table {table.shape} is not split for sequence "
                         f"{mesh.shape['sequence']} (use batch.in_layout)")
    if dtype is not None:
        table = table_bits(np.asarray(table, dtype))
    return sequence.put_from_host(table, table_sharding(mesh, memory_kind))


def table_bits(table):
    """A 16-bit float table as its uint16 bits (numpy or jax; others unchanged): the splice
    gathers integers, because XLA:CPU widens a bfloat16 gather's whole operand to float32
    first (a float32 copy of the table per step, measured in bench/trainer_memory.py)."""
    if table.dtype.itemsize == 2 and np.issubdtype(table.dtype, np.floating) or \
            str(table.dtype) == "bfloat16":
        if isinstance(table, np.ndarray):
            return table.view(np.uint16)
        return jax.lax.bitcast_convert_type(table, np.uint16)
    return table


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
    """Per-row arrays onto the mesh (`row_sharding`). With several processes each holds the
    same global host arrays and places its own devices' slices (no cross-process check)."""
    out = {}
    for name, a in arrays.items():
        sharding = row_sharding(mesh, name, a.shape, rules, stacked=stacked)
        out[name] = jax.device_put(a, sharding) if sharding.is_fully_addressable else \
            sequence.put_from_host(np.asarray(a), sharding)
    return out


def batch_shardings(mesh, batch_size: int, rules: mesh_lib.Rules = mesh_lib.DEFAULT_RULES
                    ) -> dict[str, NamedSharding]:
    """Where `place_batch` puts each field of a `SequenceBatch` of `batch_size` rows."""
    out = {"video_table": table_sharding(mesh)}
    for f in dataclasses.fields(SequenceBatch):
        if f.name not in SHARED_FIELDS:
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
