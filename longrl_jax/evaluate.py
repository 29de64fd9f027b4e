"""Held-out evaluation through the rollout server: accuracy and format rate per category."""

from __future__ import annotations

import collections

import numpy as np

from longrl_jax.rl import rewards


def decode(tokenizer, token_ids, stop: tuple[int, ...]) -> str:
    ids = [t for t in token_ids if t not in stop]
    return tokenizer.decode(ids, skip_special_tokens=False)


def evaluate(serving, prompts, tokenizer, tokens, *, max_tokens: int, temperature: float = 0.0,
             batch: int = 64, judge=None, seed: int = 0) -> dict:
    """{"accuracy", "format", "overall", "n", "per_category": {...}, "samples": [...first 8]}."""
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    samples = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        outs = serving.generate(chunk, n=1, max_tokens=max_tokens, temperature=temperature,
                                seed=seed, stop_token_ids=tokens.stop)
        texts = [decode(tokenizer, o[0].token_ids, tokens.stop) for o in outs]
        scores = rewards.score_batch(texts, [p.example.answer for p in chunk],
                                     [p.example.problem_type for p in chunk], judge=judge,
                                     questions=[p.example.problem for p in chunk])
        for p, text, s in zip(chunk, texts, scores):
            for cat in (p.example.category or "all", "overall"):
                per[cat]["accuracy"].append(s["accuracy"])
                per[cat]["format"].append(s["format"])
            if len(samples) < 8:
                samples.append({"problem_id": p.example.problem_id, "answer": p.example.answer,
                                "response": text, **s})
    summary = {cat: {"n": len(v["accuracy"]), "accuracy": float(np.mean(v["accuracy"])),
                     "format": float(np.mean(v["format"]))} for cat, v in per.items()}
    overall = summary.pop("overall", {"n": 0, "accuracy": 0.0, "format": 0.0})
    return {**overall, "per_category": summary, "samples": samples}
