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
        self._retie_lm_head()
        return len(table)

    def _retie_lm_head(self) -> None:
        """With tied embeddings the checkpoint has no lm_head tensor, so vLLM's layer-wise
        reload puts the *old* head back ("ParallelLMHead: Failed to load weights"): on CPU the
        head shares the new weight but keeps the repacked GEMM copy (`cpu_linear`) of the old
        one, so logits silently come from the old embedding. Re-tie if needed and redo the
        backend's post-load processing."""
        model = self.model_runner.get_model()
        cfg = self.model_runner.model_config.hf_config
        if not getattr(cfg, "tie_word_embeddings", False):
            return
        head = getattr(model, "lm_head", None)
        embed = model.get_submodule("model.embed_tokens")
        if head is None:
            return
        if head.weight.data_ptr() != embed.weight.data_ptr():
            with torch.no_grad():
                head.weight.copy_(embed.weight)
        method = getattr(head, "quant_method", None)
        if method is not None:  # the CPU backend keeps a repacked copy for its GEMM
            method.process_weights_after_loading(head)
