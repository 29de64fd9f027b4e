"""The embedding cache and its tool: bad rows reported, reruns hit, sampling or weight changes
miss, corrupt entries are recomputed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from longrl_jax.data import embed_cache, synthetic
from longrl_jax.data.frames import Sampling, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache_data")
    synthetic.generate(str(d), num_train=3, num_eval=1, num_frames=32, size=32)
    rows = [json.loads(line) for line in open(d / "train.jsonl")]
    (d / "videos" / "empty.mp4").write_bytes(b"")
    data = open(d / "videos" / rows[0]["videos"][0], "rb").read()
    (d / "videos" / "cut.mp4").write_bytes(data[: len(data) // 3])
    (d / "videos" / "junk.mp4").write_bytes(os.urandom(4000))
    bad = ["{oops", json.dumps({**rows[0], "answer": 7}),
           json.dumps({**rows[0], "videos": ["../../etc/passwd"]}),
           json.dumps({**rows[0], "videos": ["empty.mp4"]}),
           json.dumps({**rows[0], "videos": ["cut.mp4"]}),
           json.dumps({**rows[0], "videos": ["nope.mp4"]}),
           json.dumps({**rows[0], "videos": ["junk.mp4"]})]
    lines = [json.dumps(rows[0]), *bad[:3], json.dumps(rows[1]), *bad[3:], json.dumps(rows[2]),
             json.dumps(rows[0])]  # a repeated video is encoded once
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _run(d, cache, *extra):
    report = d / "report.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "tools/cache_video_embeds.py", "--config=configs/demo.py",
                        f"--data={d / 'mixed.jsonl'}", f"--video_dir={d / 'videos'}",
                        f"--cache_dir={cache}", f"--report={report}", "--config.mesh.fsdp=4",
                        *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(report))


def test_tool_reports_bad_rows_and_reuses_the_cache(dataset, tmp_path):
    cache = tmp_path / "cache"
    first = _run(dataset, cache)
    assert first["computed"] == 3 and first["cached"] == 0
    reasons = {s["row"]: s["reason"] for s in first["skipped"]}
    assert sorted(reasons) == [1, 2, 3, 5, 6, 7, 8]
    assert "malformed JSON" in reasons[1] and "answer is a int" in reasons[2]
    assert "escapes the video dir" in reasons[3] and "empty video" in reasons[5]
    assert "missing video" in reasons[7] and "unreadable" in reasons[8]
    assert "unreadable" in reasons[6] or "truncated" in reasons[6]
    again = _run(dataset, cache)
    assert again["computed"] == 0 and again["cached"] == 3
    fewer = _run(dataset, cache, "--config.data.num_frames=8")
    assert fewer["computed"] == 3
    other_weights = _run(dataset, cache, "--config.seed=1")
    assert other_weights["computed"] == 3


def test_corrupt_or_mismatched_entries_are_recomputed(tmp_path):
    video = tmp_path / "v.mp4"
    write_video(str(video), np.zeros((8, 32, 32, 3), np.uint8))
    cache = embed_cache.EmbedCache(str(tmp_path / "c"), fingerprint="abc")
    s = Sampling(num_frames=4, size=32)
    calls = []

    def compute():
        calls.append(1)
        return np.ones((4, 2, 3), np.float32) * len(calls), np.arange(4)

    a, status = cache.get_or_compute(str(video), s, compute)
    assert status == "computed"
    b, status = cache.get_or_compute(str(video), s, compute)
    assert status == "cached" and np.array_equal(a, b)
    digest, _ = cache.key(str(video), s)
    npy = tmp_path / "c" / digest[:2] / f"{digest}.npy"
    npy.write_bytes(b"garbage")
    _, status = cache.get_or_compute(str(video), s, compute)
    assert status == "computed"
    os.utime(video, ns=(1, 1))  # the video changed: a different key
    _, status = cache.get_or_compute(str(video), s, compute)
    assert status == "computed"
    other = embed_cache.EmbedCache(str(tmp_path / "c"), fingerprint="def")
    assert other.load(str(video), s) is None
    shutil.rmtree(tmp_path / "c")
