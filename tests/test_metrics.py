"""Metrics: the jsonl record and its crash tolerance, TensorBoard events, timers, progress bars,
the run plot and the evaluation table."""

import glob
import json
import math
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from longrl_jax.metrics import (
    MetricWriter,
    Timers,
    format_eval_report,
    plot_run,
    postfix,
    progress,
    read_metrics,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tb_scalars(logdir):
    """{tag: [(step, value)]} from the event files under `logdir`, each record's CRCs checked."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("Q", header)
            assert struct.unpack("I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
            body = data[offset + 12:offset + 12 + length]
            assert struct.unpack("I", data[offset + 12 + length:offset + 16 + length])[0] == \
                masked_crc32c(body)
            offset += 16 + length
            event = event_pb2.Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_jsonl_rows_are_flushed_and_nan_is_null(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, {"reward/mean": 0.5, "loss": jnp.float32(2.0), "samples": np.int64(16)},
                 stage="rl")
    writer.write(2, {"reward/mean": float("nan"), "kl": float("inf")}, stage="rl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # before close: flushed
    writer.close()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2] and {r["stage"] for r in rows} == {"rl"}
    assert rows[0]["reward/mean"] == 0.5 and rows[0]["loss"] == 2.0
    assert rows[0]["samples"] == 16 and isinstance(rows[0]["samples"], int)
    assert rows[1]["reward/mean"] is None and rows[1]["kl"] is None
    assert abs(rows[0]["time"] - time.time()) < 60


def test_tensorboard_tags_per_stage(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(0, {"loss": 3.0}, stage="sft")
        writer.write(1, {"loss": 2.5}, stage="sft")
        writer.write(1, {"reward/mean": 0.25, "kl": float("nan")}, stage="rl")
    assert _tb_scalars(tmp_path / "tensorboard" / "sft") == {"sft/loss": [(0, 3.0), (1, 2.5)]}
    assert _tb_scalars(tmp_path / "tensorboard" / "rl") == {"rl/reward/mean": [(1, 0.25)]}


def test_without_tensorboard_and_reserved_names(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(0, {"loss": 1.0}, stage="sft")
        try:
            writer.write(0, {"step": 1.0}, stage="sft")
            raise AssertionError("a scalar named 'step' was accepted")
        except ValueError:
            pass
    assert not (tmp_path / "tensorboard").exists()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_torn_lines_are_skipped_and_a_resumed_writer_starts_a_fresh_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(0, {"loss": 1.0}, stage="sft")
        writer.write(1, {"loss": 0.9}, stage="sft")
    with open(path, "a") as f:
        f.write('{"step": 2, "stage": "sft", "ti')  # a crash mid-write
    assert [r["step"] for r in read_metrics(path)] == [0, 1]

    with MetricWriter(tmp_path, tensorboard=False) as writer:  # the resumed run
        writer.write(2, {"loss": 0.8}, stage="sft")
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    assert len(path.read_text().splitlines()) == 4


def test_timers_sum_until_pop():
    timers = Timers()
    for _ in range(3):
        with timers("rollout"):
            time.sleep(0.02)
    with timers("update"):
        time.sleep(0.01)
    try:
        with timers("update"):
            raise RuntimeError
    except RuntimeError:
        pass
    first = timers.pop()
    assert set(first) == {"time/rollout", "time/update"}
    assert 0.06 <= first["time/rollout"] < 1.0 and 0.01 <= first["time/update"] < 1.0
    assert timers.pop() == {}


def test_progress_is_off_without_a_terminal_unless_forced(capsys):
    assert list(progress([1, 2, 3], desc="quiet")) == [1, 2, 3]  # pytest's stderr is no TTY
    assert "quiet" not in capsys.readouterr().err

    bar = progress(4, desc="rollout", unit="sample", force=True)
    bar.update(4)
    text = postfix(bar, {"reward/mean": 0.123456, "kl": jnp.float32(2e-4), "skip": 1.0},
                   keys=["reward/mean", "kl", "absent"])
    bar.close()
    assert text == "reward/mean=0.123 kl=0.0002"
    err = capsys.readouterr().err
    assert "rollout" in err and "4/4" in err and "sample" in err and text in err


def _full_run(path):
    with MetricWriter(path, tensorboard=False) as writer:
        for step in range(10):
            writer.write(step, {"loss": 1.0 / (step + 1)}, stage="sft")
        for step in range(10, 30):
            writer.write(step, {"reward/mean": math.tanh(step / 10), "kl": 0.01}, stage="rl")
            if step % 5 == 0:
                writer.write(step, {"eval/accuracy": step / 40}, stage="eval")
        writer.write(30, {"reward/mean": float("nan")}, stage="rl")
    return os.path.join(path, "metrics.jsonl")


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


def test_plot_full_and_partial_runs(tmp_path):
    full = _full_run(tmp_path / "full")
    assert plot_run(full, str(tmp_path / "full.png")) == str(tmp_path / "full.png")
    _assert_png(tmp_path / "full.png")

    with MetricWriter(tmp_path / "sft_only", tensorboard=False) as writer:
        writer.write(0, {"loss": 1.0}, stage="sft")
    partial = tmp_path / "sft_only" / "metrics.jsonl"
    _assert_png(plot_run(str(partial), str(tmp_path / "plots" / "partial.png")))
    _assert_png(plot_run(full, str(tmp_path / "other_keys.png"), reward_key="loss",
                         eval_key="eval/format"))


def test_eval_report_is_aligned():
    report = format_eval_report({
        "temporal_order": {"n": 120, "accuracy": 0.5333, "format": 0.99},
        "counting": {"n": 7, "accuracy": 1.0},
        "overall": {"n": 127, "accuracy": 0.5591, "format": float("nan")},
    })
    lines = report.splitlines()
    assert lines[0].split() == ["category", "n", "accuracy", "format"]
    assert lines[1].split() == ["temporal_order", "120", "0.533", "0.990"]
    assert lines[2].split() == ["counting", "7", "1.000", "-"]
    assert lines[3].split() == ["overall", "127", "0.559", "-"]
    assert len({len(line) for line in lines}) == 1  # right-aligned to one width
    assert len({line.index(line.split()[1]) + len(line.split()[1]) for line in lines}) == 1
