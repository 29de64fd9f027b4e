"""What a run reports: scalars to `metrics.jsonl` and TensorBoard, timers, progress bars, a
plot of the run, and the per-category evaluation table.

`metrics.jsonl` is the record (one JSON object per line, flushed at every write, readable after
a crash); TensorBoard is for watching. Only JAX process 0 writes, so trainers call the writer
unconditionally on every host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

_RESERVED = ("step", "stage", "time")


# ------------------------------------------------------------------------------------------------
# Scalars.

class MetricWriter:
    """Appends `{"step", "stage", "time", **scalars}` lines to `workdir/metrics.jsonl` and writes
    TensorBoard scalars `<stage>/<name>` under `workdir/tensorboard/<stage>`.

    Non-finite values become null in JSON (NaN is not JSON) and are left out of TensorBoard.
    Reopening a workdir appends, so a resumed run keeps one file; rows of steps redone after a
    resume appear twice (`plot_run` keeps the last).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self._active = jax.process_index() == 0
        self._tensorboard = tensorboard
        self._tb: dict[str, Any] = {}
        self._file = None
        if self._active:
            os.makedirs(self.workdir, exist_ok=True)
            self._file = open(self.path, "a")
            if self._file.tell() and not _ends_with_newline(self.path):
                self._file.write("\n")  # end a line torn by a crash; its row stays unreadable

    def write(self, step: int, scalars: Mapping[str, Any], *, stage: str) -> None:
        if not self._active:
            return
        clash = set(scalars) & set(_RESERVED)
        if clash:
            raise ValueError(f"scalar names {sorted(clash)} are reserved")
        values = {name: _python_scalar(v) for name, v in scalars.items()}
        row = {"step": int(step), "stage": stage, "time": time.time(),
               **{k: v if _finite(v) else None for k, v in values.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard:
            writer = self._writer(stage)
            for name, v in values.items():
                if _finite(v):
                    writer.add_scalar(f"{stage}/{name}", v, int(step))
            writer.flush()

    def _writer(self, stage: str):
        if stage not in self._tb:
            from tensorboardX import SummaryWriter
            self._tb[stage] = SummaryWriter(os.path.join(self.workdir, "tensorboard", stage))
        return self._tb[stage]

    def close(self) -> None:
        for writer in self._tb.values():
            writer.close()
        self._tb.clear()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _python_scalar(v: Any) -> int | float:
    """A Python int or float from a number, numpy scalar or one-element (jax) array."""
    item = np.asarray(v).item()
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        return float(item)
    return item


def _finite(v: int | float) -> bool:
    return isinstance(v, int) or math.isfinite(v)


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl. A line that does not parse is a write torn by a crash (the
    last line, or one a resumed run ended): it is skipped with a warning."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("%s:%d: skipping a torn line %.60r", path, number, line)
    return rows


# ------------------------------------------------------------------------------------------------
# Timers and progress.

class Timers:
    """Wall-clock seconds by name: `with timers("rollout"): ...`; `pop()` returns the sums since
    the last pop as `{"time/rollout": s}`. JAX dispatches asynchronously: block on the result
    inside the `with` to time the computation rather than its dispatch."""

    def __init__(self):
        self._seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{name}": s for name, s in self._seconds.items()}
        self._seconds.clear()
        return out


def progress(iterable_or_total: Iterable | int, *, desc: str | None = None, unit: str = "it",
             force: bool = False, **kwargs):
    """A tqdm bar on stderr over an iterable, or counting to a total (advance with `.update`).
    Off when stderr is not a terminal (log files stay clean) unless `force`."""
    from tqdm import tqdm
    if isinstance(iterable_or_total, int):
        iterable, total = None, iterable_or_total
    else:
        iterable, total = iterable_or_total, kwargs.pop("total", None)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not (force or sys.stderr.isatty()), dynamic_ncols=True, **kwargs)


def postfix(bar, scalars: Mapping[str, Any], *, keys: Iterable[str] | None = None) -> str:
    """Shows `name=value` (3 significant digits) for `keys` (default: all) after the bar."""
    names = [k for k in (keys if keys is not None else scalars) if k in scalars]
    text = " ".join(f"{k}={_python_scalar(scalars[k]):.3g}" for k in names)
    bar.set_postfix_str(text, refresh=False)
    return text


# ------------------------------------------------------------------------------------------------
# Plot and evaluation table.

def plot_run(metrics_jsonl: str, out_png: str, *, reward_key: str = "reward/mean",
             eval_key: str = "eval/accuracy") -> str:
    """A PNG of the training reward over steps (one line per stage) beside the evaluation
    accuracy points; a panel whose key no row has says so instead. Returns `out_png`."""
    from matplotlib.figure import Figure  # no pyplot: leaves the process's backend alone

    rows = read_metrics(metrics_jsonl)
    fig = Figure(figsize=(11, 4), dpi=100)
    panels = ((reward_key, "training reward", "-"), (eval_key, "evaluation", "o-"))
    for ax, (key, title, style) in zip(fig.subplots(1, 2), panels):
        series = _series(rows, key)
        for stage, points in series.items():
            steps, values = zip(*sorted(points.items()))
            ax.plot(steps, values, style, label=stage, markersize=4)
        if series:
            ax.legend(title="stage")
        else:
            ax.text(0.5, 0.5, f"no '{key}' in {os.path.basename(metrics_jsonl)}",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl))) or "run")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def _series(rows: list[dict], key: str) -> dict[str, dict[int, float]]:
    """{stage: {step: value}} of the rows with a finite `key`; a step written twice (a resumed
    run redoing it) keeps its last value."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            series[row.get("stage", "")][row["step"]] = value
    return dict(series)


def format_eval_report(per_category: Mapping[str, Mapping[str, float]]) -> str:
    """An aligned text table: category, n, accuracy, format (rows in the given order; a missing
    value shows as '-')."""
    header = ("category", "n", "accuracy", "format")
    lines = [header]
    for category, m in per_category.items():
        n = m.get("n")
        lines.append((str(category), "-" if n is None else str(int(n)),
                      _fraction(m.get("accuracy")), _fraction(m.get("format"))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
        for line in lines)


def _fraction(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"
