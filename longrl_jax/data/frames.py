"""Video frames for the vision tower: decord decoding, uniform or fps sampling, resize, normalise.

Decoding is batched (`get_batch` on `batch_frames` indices at a time) and `FramePrefetcher` runs
it in background threads ahead of use. `decode_frames` is what training uses: uint8 frames at
their native size, resized and normalised later on the device (4x fewer bytes than float32 for
frames no larger than the model's); `load_frames` is the host PIL pipeline, the reference. Every
failure (missing, empty, unreadable or truncated file) raises `VideoError` with the reason; the
data layer reports and skips, never substitutes another video.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


class VideoError(ValueError):
    """A video that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How frames are chosen. `num_frames`: uniform over the whole video (Long-RL's linspace).
    `fps`: one frame every 1/fps seconds, at most `max_frames` (uniformly thinned beyond)."""

    num_frames: int | None = 16
    fps: float | None = None
    max_frames: int | None = None
    size: int = 448

    def __post_init__(self):
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("choose exactly one of num_frames or fps sampling")
        if self.num_frames is not None and self.num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    def key(self) -> str:
        """Identifies the sampling in cache keys."""
        return f"n{self.num_frames}-fps{self.fps}-max{self.max_frames}-s{self.size}"


def sample_indices(total: int, video_fps: float, sampling: Sampling) -> np.ndarray:
    """Frame indices to decode, increasing. Uniform sampling may repeat indices of a video
    shorter than `num_frames` (the count is what the model expects)."""
    if total <= 0:
        raise VideoError("the video has no frames")
    if sampling.num_frames is not None:
        return np.linspace(0, total - 1, sampling.num_frames).round().astype(np.int64)
    if not video_fps or video_fps <= 0:
        raise VideoError(f"the video reports fps={video_fps}; cannot sample by fps")
    step = video_fps / sampling.fps
    idx = np.unique(np.floor(np.arange(0, total, step)).astype(np.int64))
    idx = idx[idx < total]
    if sampling.max_frames is not None and len(idx) > sampling.max_frames:
        idx = idx[np.linspace(0, len(idx) - 1, sampling.max_frames).round().astype(np.int64)]
    return idx


def normalize(frames_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 in [-1, 1] (SigLIP mean/std 0.5)."""
    return (frames_uint8.astype(np.float32) / 255.0 - SIGLIP_MEAN) / SIGLIP_STD


def _open(path: str):
    import decord

    if not os.path.exists(path):
        raise VideoError(f"missing video file {path}")
    if os.path.getsize(path) == 0:
        raise VideoError(f"empty video file {path}")
    try:
        # decord2's own width/height resize mis-sizes its buffer; we resize after decoding.
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError / RuntimeError
        raise VideoError(f"unreadable video {path}: {str(e).splitlines()[0][:200]}") from None


def resize(frames_uint8: np.ndarray, size: int) -> np.ndarray:
    """[N, H, W, 3] -> [N, size, size, 3], bicubic (the SigLIP processor's resample)."""
    from PIL import Image

    if frames_uint8.shape[1:3] == (size, size):
        return frames_uint8
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC))
                     for f in frames_uint8])


def video_info(path: str) -> tuple[int, float]:
    """(frame count, fps) without decoding frames."""
    vr = _open(path)
    try:
        return len(vr), float(vr.get_avg_fps())
    except Exception as e:
        raise VideoError(f"unreadable video {path}: {str(e).splitlines()[0][:200]}") from None


def decode_frames(path: str, sampling: Sampling, *,
                  batch_frames: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 frames [N, H, W, 3] at the video's own size, indices [N]): the fast loader. The
    resize and normalisation are left to the stage-1 computation on the device
    (`models.siglip.FramePreprocess`), so the host only decodes, `batch_frames` frames per
    `get_batch` call, into one preallocated array."""
    vr = _open(path)
    try:
        total, fps = len(vr), float(vr.get_avg_fps())
    except Exception as e:
        raise VideoError(f"unreadable video {path}: {e}") from None
    idx = sample_indices(total, fps, sampling)
    out = None
    for start in range(0, len(idx), batch_frames):
        part = idx[start:start + batch_frames]
        try:
            frames = _get_batch(vr, part)
        except Exception as e:
            raise VideoError(f"truncated or corrupt video {path} (frames {part[0]}-{part[-1]} of "
                             f"{total}): {str(e).splitlines()[0][:200]}") from None
        if frames.shape[0] != len(part):
            raise VideoError(f"truncated video {path}: got {frames.shape[0]} of {len(part)} "
                             "frames")
        if out is None:
            out = np.empty((len(idx),) + frames.shape[1:], np.uint8)
        out[start:start + len(part)] = frames
    return out, idx


def load_frames(path: str, sampling: Sampling, *, batch_frames: int = 32,
                normalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(frames [N, size, size, 3], indices [N]) resized on the host with PIL (the reference the
    device path equals). Float32 in [-1, 1] when `normalized`, else uint8."""
    frames, idx = decode_frames(path, sampling, batch_frames=batch_frames)
    out = np.empty((len(idx), sampling.size, sampling.size, 3),
                   np.float32 if normalized else np.uint8)
    for start in range(0, len(idx), batch_frames):
        part = resize(frames[start:start + batch_frames], sampling.size)
        out[start:start + len(part)] = normalize(part) if normalized else part
    return out, idx


def _get_batch(vr, indices: np.ndarray) -> np.ndarray:
    """decord's get_batch, with a per-frame fallback. For some widths (48 px, say) decord2 hands
    out each RGB row with its line padding, shaped as if it had 4 channels, and its batch copy
    then fails its size check; the fallback drops the padding of each row."""
    try:
        return vr.get_batch(indices.tolist()).asnumpy()
    except Exception as e:
        if "DECORDArrayCopyFromTo" not in str(e):
            raise
    return np.stack([_unpad_rows(vr[int(i)].asnumpy()) for i in indices])


def _unpad_rows(frame: np.ndarray) -> np.ndarray:
    if frame.shape[-1] == 3:
        return frame
    h, w = frame.shape[:2]
    return frame.reshape(h, -1)[:, :w * 3].reshape(h, w, 3)


class FramePrefetcher:
    """Decodes upcoming videos in background threads (decord releases the GIL while decoding),
    keeping at most `depth` results in flight, in input order. Each item yields
    (item, frames, indices) or (item, VideoError, None); frames as `load_frames` gives them, or
    with `native` as `decode_frames` does."""

    def __init__(self, items: Iterable, path_of: Callable[[object], str], sampling: Sampling,
                 *, workers: int = 2, depth: int = 4, batch_frames: int = 32,
                 native: bool = False):
        self._items = iter(items)
        self._native = native
        self._path_of = path_of
        self._sampling = sampling
        self._depth = depth
        self._batch = batch_frames
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="decode")

    def _load(self, item):
        try:
            load = decode_frames if self._native else load_frames
            frames, idx = load(self._path_of(item), self._sampling, batch_frames=self._batch)
            return item, frames, idx
        except VideoError as e:
            return item, e, None

    def __iter__(self) -> Iterator:
        pending: list[concurrent.futures.Future] = []
        try:
            for item in self._items:
                pending.append(self._pool.submit(self._load, item))
                if len(pending) >= self._depth:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)


def write_video(path: str, frames_uint8: Sequence[np.ndarray] | np.ndarray, fps: float = 30,
                *, crf: int = 18) -> None:
    """Writes frames [N, H, W, 3] uint8 as H.264 mp4 with PyAV (even sizes are padded)."""
    import av

    frames = np.asarray(frames_uint8)
    n, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    tmp = f"{path}.tmp{os.getpid()}.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = pw, ph
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "g": "30", "threads": "1"}
        for f in frames:
            if (ph, pw) != (h, w):
                f = np.pad(f, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
