"""Held-out evaluation through the rollout server: accuracy and format rate per category.

One `Evaluator` per run serves the evaluations between stages and the periodic ones inside RL,
so both ask the same questions with the same sampling and the same scoring (judge included).
"""

from __future__ import annotations

import collections

import numpy as np

from longrl_jax.rl.rollouts import Rollouts, sample_and_score


def summarize(rollouts: Rollouts, keep_samples: int = 8) -> dict:
    """{"accuracy", "format", "n", "per_category": {...}, "samples": [first few]}."""
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for p, s in zip(rollouts.prompts, rollouts.scores):
        for cat in (p.example.category or "all", "overall"):
            per[cat]["accuracy"].append(s["accuracy"])
            per[cat]["format"].append(s["format"])
    samples = [{"problem_id": p.example.problem_id, "answer": p.example.answer, "response": t,
                **s} for p, t, s in list(zip(rollouts.prompts, rollouts.texts,
                                             rollouts.scores))[:keep_samples]]
    summary = {cat: {"n": len(v["accuracy"]), "accuracy": float(np.mean(v["accuracy"])),
                     "format": float(np.mean(v["format"]))} for cat, v in per.items()}
    overall = summary.pop("overall", {"n": 0, "accuracy": 0.0, "format": 0.0})
    return {**overall, "per_category": summary, "samples": samples}


def evaluate(connection, prompts, tokenizer, tokens, *, max_tokens: int,
             temperature: float = 0.0, batch: int = 64, judge=None, seed: int = 0) -> dict:
    """One response per prompt, `batch` prompts per request; see `summarize`."""
    parts = [sample_and_score(connection, prompts[i:i + batch], n=1, tokenizer=tokenizer,
                              tokens=tokens, judge=judge, max_tokens=max_tokens,
                              temperature=temperature, seed=seed)
             for i in range(0, len(prompts), batch)]
    return summarize(Rollouts.concat(parts))


class Evaluator:
    """The run's held-out set (prompts built once) and how it is evaluated."""

    def __init__(self, ctx, connection):
        self.ctx = ctx
        self.connection = connection
        self._prompts = None

    @property
    def prompts(self):
        if self._prompts is None:
            self._prompts = self.ctx.prompts(self.ctx.eval_examples())
        return self._prompts

    def __call__(self) -> dict:
        c = self.ctx.config
        return evaluate(self.connection, self.prompts, self.ctx.tokenizer, self.ctx.tokens,
                        max_tokens=c.eval.max_tokens, temperature=c.eval.temperature,
                        judge=self.ctx.judge, seed=c.seed)
