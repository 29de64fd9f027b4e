"""What every stage of a run shares: config, data, tokenizer, model, mesh, embedders, metrics.

`main` builds one `RunContext` and hands it to each stage trainer, so a trainer stays one
readable file that asks the context for prompts and batches of examples instead of wiring up
data, tokenizer and video encoding itself.

With several processes (`hosts`), every process draws the same global examples (the loader
reads the split's small records in one seeded order everywhere), but decodes and embeds only
the videos of its own block of each draw (`hosts.share`), on its own devices; the prompts are
then exchanged, so every process holds the step's global prompts in the global order and the
step is the same set of examples whatever the process count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Iterator

from jax.sharding import Mesh
from ml_collections import ConfigDict

from longrl_jax import hosts
from longrl_jax import prompts as prompts_lib
from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data.frames import VideoError
from longrl_jax.embedder import VideoEmbedder
from longrl_jax.metrics import MetricWriter, Timers
from longrl_jax.models import VLM
from longrl_jax.parallel.mesh import Rules
from longrl_jax.parallel.video_encoding import frame_axes
from longrl_jax.rl.rewards import Judge

log = logging.getLogger(__name__)


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
    _encoder: tuple | None = None

    def encoder(self) -> tuple:
        """(model, mesh) the videos are encoded with: the run's, or with several processes a
        copy of the vision side replicated on this process's own devices (a process encodes
        only its own videos; a computation on the global mesh would need every process). Made
        once, at the same point on every process (the copy is gathered collectively)."""
        if self._encoder is None:
            if hosts.count() == 1:
                self._encoder = (self.model, self.mesh)
            else:
                self._encoder = hosts.local_copy(self.model)
        return self._encoder

    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def embedder(self, num_frames: int = 0) -> VideoEmbedder:
        """The embedder for `num_frames` per video (0: the config's sampling), made once."""
        if num_frames not in self._embedders:
            model, mesh = self.encoder()
            e = VideoEmbedder.from_config(model, mesh, self.config, self.path("cache"),
                                          self.rules, num_frames=num_frames)
            if mesh is not self.mesh:    # chunks as the run's mesh would make them
                axes = frame_axes(self.mesh, self.rules)
                e.chunks_like = math.prod(self.mesh.shape[a] for a in axes)
            self._embedders[num_frames] = e
        return self._embedders[num_frames]

    def prompts(self, examples, *, num_frames: int = 0) -> list[prompts_lib.Prompt]:
        """Prompts for the examples whose videos decode, in order; the others are skipped.
        With several processes `examples` is the same global draw on every process: each
        embeds its own block and every process gets the whole list back."""
        examples = list(examples)
        if hosts.count() == 1:
            out = self._prompts(examples, num_frames)
        else:
            out = hosts.gather_blocks(self._prompts(examples[hosts.share(len(examples))],
                                                    num_frames))
        # the record that runs with different process counts drew the same examples
        log.info("prompts: %s", [p.example.problem_id for p in out])
        return out

    def _prompts(self, examples, num_frames: int) -> list[prompts_lib.Prompt]:
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
        """Every video the run could not use (by any process), with the reason."""
        mine = {path: why for e in self._embedders.values() for path, why in e.failed.items()}
        return {k: v for part in hosts.allgather_objects(mine) for k, v in part.items()}

    def loader(self, split: str, *, seed: int):
        """The split's examples in one seeded order, the same on every process (each process
        then embeds its own block of every draw: `prompts`); its state is the same on every
        process, so one saved copy resumes them all."""
        source = lvr.data_source(self.records_dir, split)
        return lvr.loader(source, seed=seed, shuffle=True, num_epochs=None, shard_index=0,
                          shard_count=1)

    def eval_examples(self) -> list[lvr.Example]:
        source = lvr.data_source(self.records_dir, "eval")
        n = min(len(source), self.config.eval.num_examples or len(source))
        return [lvr.decode(source[i]) for i in range(n)]


def next_examples(iterator: Iterator, n: int) -> list[lvr.Example]:
    return [next(iterator) for _ in range(n)]
