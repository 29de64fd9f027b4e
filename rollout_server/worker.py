"""vLLM worker extension: loads a weight update from one flat file in shared memory.

On the CPU backend `model.load_weights` fails because linear weights are repacked after loading;
the worker's `reload_weights(weights_iterator=...)` redoes that processing. Tensors given as RPC
arguments arrive as Python lists, so only the file path and a small table cross the RPC channel.
"""

from __future__ import annotations

import os

import torch


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`LLM(worker_extension_cls=...)`), reached by collective_rpc."""

    def load_flat_weights(self, path: str, table: list) -> int:
        """`table` rows are [name, dtype, shape, offset, nbytes]; returns the tensors loaded."""
        from rollout_server.tensors import from_bytes

        size = os.path.getsize(path)
        raw = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)

        def tensors():
            for name, dtype, shape, offset, nbytes in table:
                yield name, from_bytes(raw[offset:offset + nbytes], dtype, shape)

        self.reload_weights(weights_iterator=tensors())
        return len(table)
