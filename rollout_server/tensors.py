"""Raw-bytes tensors: the dtype names of the protocol and their torch types.

Names are NumPy's (`np.dtype(...).name`, with ml_dtypes' `bfloat16`), so the trainer writes
`array.dtype.name` and the server reads bytes back with `torch.frombuffer`. Nothing is pickled.
"""

from __future__ import annotations

import math

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class TensorError(ValueError):
    """A tensor's declared name, dtype, shape or bytes are unusable; the message says which."""


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorError(f"unknown dtype {name!r}; known: {sorted(DTYPES)}") from None


def nbytes(dtype: str, shape) -> int:
    return math.prod(int(s) for s in shape) * torch_dtype(dtype).itemsize


def from_bytes(buf, dtype: str, shape) -> torch.Tensor:
    """A tensor viewing `buf` (bytes, bytearray, memoryview or uint8 tensor) without copying."""
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise TensorError(f"negative dimension in shape {shape}")
    want = nbytes(dtype, shape)
    if isinstance(buf, torch.Tensor):
        raw = buf
    else:
        raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
    if raw.numel() != want:
        raise TensorError(f"{raw.numel()} bytes for dtype {dtype} and shape {shape}, "
                          f"which need {want}")
    return raw.view(torch_dtype(dtype)).reshape(shape)


def all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """NaN/Inf check: a chunk is finite iff its min and max are (`aminmax` propagates NaN).

    One read of the bytes and no temporaries, so a multi-GB update never makes a full-size boolean
    copy, as `isfinite(...).all()` does before its second pass; much faster on CPU (measured in
    bench/RESULTS.md, "Rollout server: weight sync")."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        lo, hi = torch.aminmax(flat[i:i + chunk])
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            return False
    return True
