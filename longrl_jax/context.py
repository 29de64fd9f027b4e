"""What every stage of a run shares: config, data, tokenizer, model, mesh, embedders, metrics.

`main` builds one `RunContext` and hands it to each stage trainer, so a trainer stays one
readable file that asks the context for prompts and batches of examples instead of wiring up
data, tokenizer and video encoding itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from jax.sharding import Mesh
from ml_collections import ConfigDict

from longrl_jax import prompts as prompts_lib
from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data.frames import VideoError
from longrl_jax.embedder import VideoEmbedder
from longrl_jax.metrics import MetricWriter, Timers
from longrl_jax.models import VLM
from longrl_jax.parallel.mesh import Rules
from longrl_jax.rl.rewards import Judge


@dataclasses.dataclass
class RunContext:
    """One run's shared objects. `prompts(examples)` is how a stage turns rows into model
    inputs: each example's video is embedded (cache, MR-SP stage 1) at the stage's frame count;
    an example whose video cannot be used is left out, and its embedder records why."""

    config: ConfigDict
    workdir: str
    model: VLM
    mesh: Mesh
    rules: Rules
    tokenizer: object                  # a transformers tokenizer
    tokens: prompts_lib.Tokens
    tokenizer_dir: str
    records_dir: str
    writer: MetricWriter
    timers: Timers
    judge: Judge | None = None
    _embedders: dict[int, VideoEmbedder] = dataclasses.field(default_factory=dict)

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def embedder(self, num_frames: int = 0) -> VideoEmbedder:
        """The embedder for `num_frames` per video (0: the config's sampling), made once."""
        if num_frames not in self._embedders:
            self._embedders[num_frames] = VideoEmbedder.from_config(
                self.model, self.mesh, self.config, self.path("cache"), self.rules,
                num_frames=num_frames)
        return self._embedders[num_frames]

    def prompts(self, examples, *, num_frames: int = 0) -> list[prompts_lib.Prompt]:
        """Prompts for the examples whose videos decode; the others are skipped."""
        embedder = self.embedder(num_frames)
        out = []
        for ex in examples:
            try:
                key, rows = embedder(ex.videos[0])
            except VideoError:
                continue
            out.append(prompts_lib.make_prompt(self.tokenizer, self.tokens, ex, rows, key,
                                               thinking=self.config.thinking))
        return out

    def skipped_videos(self) -> dict[str, str]:
        """Every video the run could not use, with the reason."""
        return {path: why for e in self._embedders.values() for path, why in e.failed.items()}

    def loader(self, split: str, *, seed: int):
        source = lvr.data_source(self.records_dir, split)
        return lvr.loader(source, seed=seed, shuffle=True, num_epochs=None, shard_index=0,
                          shard_count=1)

    def eval_examples(self) -> list[lvr.Example]:
        source = lvr.data_source(self.records_dir, "eval")
        n = min(len(source), self.config.eval.num_examples or len(source))
        return [lvr.decode(source[i]) for i in range(n)]


def next_examples(iterator: Iterator, n: int) -> list[lvr.Example]:
    return [next(iterator) for _ in range(n)]
