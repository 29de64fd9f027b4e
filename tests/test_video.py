"""Frame sampling returns exactly the intended frames: each generated frame encodes its own
index in a 4x4 grid of black/white cells, decoded back from every sampled frame, on the host PIL
path and on the device path (uint8 at native size, Pillow's resize and SigLIP's normalisation in
jnp inside stage 1), which must equal the host path bit for bit."""

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


# ------------------------------------------------------------------------------------------------
# Frames on the device: uint8 at native size, resized and normalised inside stage 1
# ------------------------------------------------------------------------------------------------

def _pil_resize(frames, height, width):
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC))
                     for f in frames])


@pytest.mark.parametrize("hw,out", [((256, 256), (448, 448)), ((720, 1280), (448, 448)),
                                    ((1280, 720), (448, 448)), ((50, 34), (28, 28)),
                                    ((34, 50), (28, 28)), ((64, 64), (32, 32)),
                                    ((17, 300), (40, 7)), ((3, 5), (32, 32)),
                                    ((48, 48), (48, 48)), ((48, 40), (32, 40))])
def test_device_resize_is_pillow_bicubic_bit_for_bit(hw, out):
    """Upscaling, downscaling (landscape: width pass first; portrait: height pass first in
    Pillow 13), one axis only, identity: every uint8 equals Pillow's."""
    import jax

    from longrl_jax.models.image_resize import resize_bicubic

    h, w = hw
    rs = np.random.RandomState(h * 1000 + w)
    frames = rs.randint(0, 256, (3, h, w, 3)).astype(np.uint8)
    frames[1] = (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w))[..., None]
    frames[2] = index_frames(1, h, w)[0]
    got = np.asarray(jax.jit(lambda x: resize_bicubic(x, *out))(frames))
    assert got.dtype == np.uint8 and got.shape == (3,) + out + (3,)
    np.testing.assert_array_equal(got, _pil_resize(frames, *out))


@pytest.mark.parametrize("name,num_frames,size", [("short", 8, 32), ("long", 64, 32),
                                                  ("odd", 16, 28), ("odd", 16, 448)])
def test_device_path_frames_are_where_the_model_expects(videos, name, num_frames, size):
    """decode_frames hands out the sampled frames at native size as uint8; SigLIP's processor
    on the device turns them into exactly the host pipeline's tensors, frame indices intact."""
    import jax

    from longrl_jax.models.image_resize import resize_bicubic
    from longrl_jax.models.siglip import FramePreprocess

    path, n, _ = videos[name]
    sampling = V.Sampling(num_frames=num_frames, size=size)
    native, idx = V.decode_frames(path, sampling, batch_frames=7)
    expected = np.linspace(0, n - 1, num_frames).round().astype(int)
    np.testing.assert_array_equal(idx, expected)
    assert native.dtype == np.uint8 and native.shape[0] == num_frames
    assert native.shape[1:3] != (size, size)  # native, not resized
    resized = np.asarray(jax.jit(lambda x: resize_bicubic(x, size, size))(native))
    host_uint8, _ = V.load_frames(path, sampling, batch_frames=7, normalized=False)
    np.testing.assert_array_equal(resized, host_uint8)
    assert [read_index(f) for f in resized] == expected.tolist()
    device = np.asarray(jax.jit(FramePreprocess(size))(native))
    host, _ = V.load_frames(path, sampling, batch_frames=7)
    assert device.shape == host.shape == (num_frames, size, size, 3)
    # same uint8; XLA's x / 255 may round differently from numpy's by one float32 ulp
    np.testing.assert_allclose(device, host, rtol=0, atol=np.spacing(np.float32(1)))


def test_preprocess_refuses_float_frames():
    from longrl_jax.models.siglip import FramePreprocess

    with pytest.raises(ValueError, match="uint8"):
        FramePreprocess(32)(np.zeros((2, 32, 32, 3), np.float32))


@pytest.fixture(scope="module")
def tiny_vlm():
    from flax import nnx

    from longrl_jax.models import VLM, ModelConfig

    return VLM(ModelConfig.tiny(vocab_size=96), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sizes", [{"sequence": 8}, {"data": 2, "fsdp": 4}])
def test_uint8_stage1_on_8_devices_equals_host_pipeline(videos, tiny_vlm, sizes):
    """uint8 native frames sharded over 8 devices, resized + normalised there, encode to the
    same embeddings as host-resized float frames encoded on one device."""
    from longrl_jax.models.siglip import FramePreprocess
    from longrl_jax.parallel import mesh as mesh_lib
    from longrl_jax.parallel import video_encoding

    path = videos["odd"][0]  # 50x34 frames -> 32x32, 13 frames: padded for the devices
    sampling = V.Sampling(num_frames=13, size=32)
    native, _ = V.decode_frames(path, sampling)
    host, _ = V.load_frames(path, sampling)
    ref = np.asarray(tiny_vlm.encode_video(host))
    out = video_encoding.encode_video_sharded(tiny_vlm, native, mesh=mesh_lib.make_mesh(sizes),
                                              frames_per_chunk=1,
                                              preprocess=FramePreprocess(32))
    assert out.shape == ref.shape
    assert float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()) < 1e-5


def test_embedder_encodes_uint8_on_the_devices_and_caches(videos, tiny_vlm, tmp_path):
    from longrl_jax.embedder import VideoEmbedder
    from longrl_jax.parallel import mesh as mesh_lib

    path = videos["short"][0]
    sampling = V.Sampling(num_frames=8, size=32)
    mesh = mesh_lib.make_mesh({"fsdp": 8})
    emb = VideoEmbedder(tiny_vlm, mesh, sampling, str(tmp_path), rules=mesh_lib.DEFAULT_RULES,
                        frames_per_chunk=2, decode_batch=3, keep_in_memory=False)
    key, rows = emb(path)
    host, _ = V.load_frames(path, sampling)
    ref = np.asarray(tiny_vlm.encode_video(host))
    assert rows.shape == ref.shape
    assert float(np.abs(rows - ref).max() / np.abs(ref).max()) < 1e-5
    np.testing.assert_allclose(emb.frames(path), host, rtol=0, atol=np.spacing(np.float32(1)))
    again = VideoEmbedder(tiny_vlm, mesh, sampling, str(tmp_path), rules=mesh_lib.DEFAULT_RULES,
                          frames_per_chunk=2, decode_batch=3)
    key2, rows2 = again(path)
    assert (key2, again.cached, again.computed) == (key, 1, 0)
    np.testing.assert_array_equal(rows2, rows)
