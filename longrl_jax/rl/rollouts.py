"""Sampled and scored responses as one flat record: what a GRPO step and an evaluation consume.

`sample_and_score` asks the rollout server for `n` responses per prompt, decodes them and scores
them all in one `rewards.score_batch` call (rule reward, or the judge for open-ended questions),
so training and evaluation score alike. `Rollouts` keeps one row per response, with the group
(prompt) it belongs to, and stays flat from here to the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from longrl_jax import hosts
from longrl_jax.prompts import Prompt, Tokens, decode_response
from longrl_jax.rl import rewards
from longrl_jax.rl.rollout_client import Sample


@dataclasses.dataclass
class Rollouts:
    prompts: list[Prompt]          # [N] the prompt of each response (repeated within a group)
    samples: list[Sample]          # [N]
    texts: list[str]               # [N] decoded, stop tokens removed
    scores: list[dict]             # [N] {"overall", "accuracy", "format"}
    group_ids: np.ndarray          # [N] int: rows with one id answer one prompt

    def __len__(self) -> int:
        return len(self.samples)

    def metric(self, name: str) -> np.ndarray:
        """[N] float32 of one score field."""
        return np.asarray([s[name] for s in self.scores], np.float32)

    def take(self, idx) -> "Rollouts":
        idx = np.asarray(idx, int)
        return Rollouts([self.prompts[i] for i in idx], [self.samples[i] for i in idx],
                        [self.texts[i] for i in idx], [self.scores[i] for i in idx],
                        self.group_ids[idx])

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        """One record of several; group ids renumbered so groups stay distinct."""
        out, offset = Rollouts([], [], [], [], np.zeros(0, int)), 0
        for p in parts:
            _, ids = np.unique(p.group_ids, return_inverse=True)
            out = Rollouts(out.prompts + p.prompts, out.samples + p.samples,
                           out.texts + p.texts, out.scores + p.scores,
                           np.concatenate([out.group_ids, ids + offset]))
            offset += int(ids.max()) + 1 if len(ids) else 0
        return out


SEED_STRIDE = 1_000_003   # rollout.proto: prompt i of a request samples with seed + i * stride


def sample_and_score(connection, prompts: list[Prompt], *, n: int, tokenizer, tokens: Tokens,
                     judge=None, timers=None, **sampling) -> Rollouts:
    """`n` responses per prompt from the rollout server, decoded and scored; `sampling` goes to
    `RolloutConnection.generate` (max_tokens, temperature, top_p, seed). `timers`
    (`metrics.Timers`) times the two halves as "rollout" and "reward".

    With several processes `prompts` is the same global list on every process: each samples
    and scores its own block (`hosts.share`) through its own server, and every process gets
    the whole record back. Prompt j of the global list samples with seed + j * SEED_STRIDE,
    whichever process and server serve it and wherever it sits in their request."""
    lo = hosts.share(len(prompts)).start
    mine = prompts[hosts.share(len(prompts))]
    if sampling.get("seed") is not None:
        sampling = dict(sampling, seed=sampling["seed"] + lo * SEED_STRIDE)
    timed = timers or (lambda name: contextlib.nullcontext())
    with timed("rollout"):
        outs = connection.generate(mine, n=n, stop_token_ids=tokens.stop, **sampling) \
            if mine else []
    with timed("reward"):
        samples = [s for group in outs for s in group]
        rows = [p for p, group in zip(mine, outs) for _ in group]
        texts = [decode_response(tokenizer, s.token_ids, tokens.stop) for s in samples]
        scores = rewards.score_batch(texts, [p.example.answer for p in rows],
                                     [p.example.problem_type for p in rows], judge=judge,
                                     questions=[p.example.problem for p in rows]) \
            if rows else []
    if hosts.count() > 1:     # the other processes' blocks (prompts are known everywhere)
        got = hosts.allgather_objects((len(outs), [len(g) for g in outs], samples, texts,
                                       scores))
        sizes = [size for _, part, *_ in got for size in part]
        samples, texts, scores = ([x for part in got for x in part[k]] for k in (2, 3, 4))
        outs = [range(k) for k in sizes]
        rows = [p for p, k in zip(prompts, sizes) for _ in range(k)]
    group_ids = np.asarray([i for i, group in enumerate(outs) for _ in group], int)
    return Rollouts(rows, samples, texts, scores, group_ids)
