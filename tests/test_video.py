"""Frame sampling returns exactly the intended frames: each generated frame encodes its own
index in a 4x4 grid of black/white cells, decoded back from every sampled frame."""

import os

import numpy as np
import pytest

from longrl_jax.data import frames as V

GRID = 4


def index_frames(n, h, w):
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        bits = [(i >> b) & 1 for b in range(GRID * GRID)]
        for b, bit in enumerate(bits):
            r, c = divmod(b, GRID)
            frames[i, r * h // GRID:(r + 1) * h // GRID, c * w // GRID:(c + 1) * w // GRID] = \
                255 * bit
    return frames


def read_index(frame):
    h, w = frame.shape[:2]
    value = 0
    for b in range(GRID * GRID):
        r, c = divmod(b, GRID)
        cell = frame[r * h // GRID + h // (4 * GRID):(r + 1) * h // GRID - h // (4 * GRID),
                     c * w // GRID + w // (4 * GRID):(c + 1) * w // GRID - w // (4 * GRID)]
        value |= int(cell.mean() > 127) << b
    return value


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    out = {}
    for name, (n, h, w, fps) in {"short": (20, 64, 64, 30), "long": (1800, 48, 48, 30),
                                 "odd": (97, 50, 34, 25)}.items():
        path = str(d / f"{name}.mp4")
        V.write_video(path, index_frames(n, h, w), fps=fps)
        out[name] = (path, n, fps)
    return out


@pytest.mark.parametrize("name,num_frames,size", [("short", 8, 32), ("short", 32, 32),
                                                  ("long", 64, 32), ("odd", 16, 28)])
def test_uniform_sampling_returns_the_linspace_frames(videos, name, num_frames, size):
    path, n, _ = videos[name]
    frames, idx = V.load_frames(path, V.Sampling(num_frames=num_frames, size=size),
                                batch_frames=7, normalized=False)
    expected = np.linspace(0, n - 1, num_frames).round().astype(int)
    np.testing.assert_array_equal(idx, expected)
    assert frames.shape == (num_frames, size, size, 3)
    assert [read_index(f) for f in frames] == expected.tolist()


@pytest.mark.parametrize("name,fps,max_frames", [("long", 2.0, None), ("long", 1.0, 25),
                                                 ("odd", 5.0, None)])
def test_fps_sampling_returns_frames_at_that_rate(videos, name, fps, max_frames):
    path, n, video_fps = videos[name]
    frames, idx = V.load_frames(path, V.Sampling(num_frames=None, fps=fps,
                                                 max_frames=max_frames, size=32),
                                normalized=False)
    every = np.floor(np.arange(0, n, video_fps / fps)).astype(int)
    expected = every if max_frames is None or len(every) <= max_frames else \
        every[np.linspace(0, len(every) - 1, max_frames).round().astype(int)]
    np.testing.assert_array_equal(idx, expected)
    assert [read_index(f) for f in frames] == expected.tolist()


def test_normalisation_is_siglip(videos):
    frames, _ = V.load_frames(videos["short"][0], V.Sampling(num_frames=2, size=32))
    assert frames.dtype == np.float32 and frames.min() >= -1.0 and frames.max() <= 1.0
    assert frames.min() < -0.9 and frames.max() > 0.9


def test_bad_videos_raise_a_clear_error(tmp_path, videos):
    with pytest.raises(V.VideoError, match="missing"):
        V.load_frames(str(tmp_path / "nope.mp4"), V.Sampling(num_frames=4, size=32))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(V.VideoError, match="empty"):
        V.load_frames(str(tmp_path / "empty.mp4"), V.Sampling(num_frames=4, size=32))
    (tmp_path / "junk.mp4").write_bytes(os.urandom(5000))
    with pytest.raises(V.VideoError, match="unreadable"):
        V.load_frames(str(tmp_path / "junk.mp4"), V.Sampling(num_frames=4, size=32))
    data = open(videos["long"][0], "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    with pytest.raises(V.VideoError, match="unreadable|truncated|corrupt"):
        V.load_frames(str(tmp_path / "cut.mp4"), V.Sampling(num_frames=64, size=32))


def test_prefetcher_keeps_order_and_reports_errors(videos, tmp_path):
    items = [videos["short"][0], str(tmp_path / "missing.mp4"), videos["odd"][0]]
    got = list(V.FramePrefetcher(items, lambda p: p, V.Sampling(num_frames=4, size=32)))
    assert [g[0] for g in got] == items
    assert isinstance(got[1][1], V.VideoError) and got[1][2] is None
    assert got[0][1].shape == (4, 32, 32, 3) and got[2][1].shape == (4, 32, 32, 3)
