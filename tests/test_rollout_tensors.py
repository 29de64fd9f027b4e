"""The rollout server's raw-bytes tensors: the finite check that guards every update."""

from __future__ import annotations

import pytest
import torch

from rollout_server.tensors import all_finite, from_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    n = 3 * 1000 + 17
    x = torch.randn(n, dtype=dtype)
    assert all_finite(x) and all_finite(x[:3000].reshape(3, -1)[:, :100])  # a strided view too
    for pos in (0, 1, 15, 999, 1000, n - 1):
        y = x.clone()
        y[pos] = bad
        assert not all_finite(y, chunk=1000), (pos, bad)
        assert not all_finite(y.reshape(1, -1)), (pos, bad)


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0))
    assert all_finite(torch.tensor([3, -7], dtype=torch.int32))  # integers are always finite
    big = torch.full((10,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    assert all_finite(big) and all_finite(-big)
    raw = torch.tensor([1.0, float("nan")]).numpy().tobytes()
    assert not all_finite(from_bytes(raw, "float32", [2]))
