"""The trainer's rollout server: started from the config, fed the policy's weights.

The server starts from an HF export of the current LLM (plus tokenizer) in the workdir, so it
serves exactly the trainer's weights from its first request; later syncs go through
`RolloutClient.update_weights` with arrays from the same mapping table as the export.
"""

from __future__ import annotations

import os

import numpy as np

from longrl_jax.models import hf
from longrl_jax.rl.rollout_launcher import RolloutServerProcess, connect


class Serving:
    def __init__(self, config, workdir: str, tokenizer_dir: str):
        self.config = config
        self.workdir = workdir
        self.tokenizer_dir = tokenizer_dir
        self.server = None
        self.version = 0
        self._model = None
        self.sent_keys: set[str] = set()

    @property
    def client(self):
        return self.server.client

    def start(self, model) -> None:
        r = self.config.rollout
        self._model = model
        if r.address:
            self.server = connect(r.address, token=r.token or None).start()
            self.sync(model)
            return
        serve_dir = os.path.join(self.workdir, "serve")
        hf.save_pretrained(model, serve_dir, dtype=np.dtype(r.dtype),
                           tokenizer_dir=self.tokenizer_dir)
        args = ["--max-model-len", str(r.max_model_len), "--dtype", r.dtype,
                "--seed", str(self.config.seed)]
        if r.block_size:
            args += ["--block-size", str(r.block_size)]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(r.kvcache_gib)}
        if r.cpu_threads_bind:
            env["VLLM_CPU_OMP_THREADS_BIND"] = r.cpu_threads_bind
        self.server = RolloutServerProcess(
            serve_dir, args=args, env=env, port=r.port or None,
            log_path=os.path.join(self.workdir, "rollout_server.log"),
            on_restart=self._resend).start()
        self.version = self.client.info().weight_version

    def _resend(self, client) -> None:
        """After a restart: the current weights (at the current version) again."""
        self.sent_keys.clear()
        if self._model is not None and self.version:
            client.update_weights(self._arrays(self._model), self.version)

    def _arrays(self, model) -> dict[str, np.ndarray]:
        return hf.hf_arrays(model, "llm", dtype=np.dtype(self.config.rollout.dtype))

    def sync(self, model) -> float:
        """Pushes the policy's LLM weights as the next version; returns the bytes sent."""
        self._model = model
        arrays = self._arrays(model)
        reply = self.server.call(lambda c: c.update_weights(arrays, self.version + 1))
        self.version = reply.weight_version
        return float(reply.nbytes)

    def put_videos(self, prompts) -> None:
        for p in prompts:
            if p.video_key not in self.sent_keys:
                self.server.call(lambda c: c.put_embeddings(p.video_key, p.video))
                self.sent_keys.add(p.video_key)

    def generate(self, prompts, **kw):
        from longrl_jax.rl.rollout_client import spliced_prompt
        self.put_videos(prompts)
        segs = [spliced_prompt(p.layout, p.video_key) for p in prompts]
        return self.server.call(lambda c: c.generate(segs, min_weight_version=self.version, **kw))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
