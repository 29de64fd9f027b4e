"""Held-out evaluation through the rollout server: the one evaluation function of the project.

`evaluate` (and `answer_questions` under it, for callers that keep every response) is what the RL
trainer's periodic evaluation, `main`'s eval stage (both through the run's `Evaluator`) and
`tools/evaluate.py` call: the same sampling (`EvalSettings`: temperature, `n` samples per
question, thinking on/off, frames or fps), the same scoring (`rewards.score_batch`: the r1v rule
reward, or the judge for open-ended questions when one is given), the same aggregation. Two
evaluations of one policy on one question set with one setting give the same numbers, wherever
they are run.

Two accuracies are reported side by side: the original's scorer (math-aware comparison, then
exact match of the `<answer>` span; `accuracy`) and a lenient option-letter extraction
(`lenient_accuracy`, the first option letter of the answer span or the reply, as third-party
ports and lmms-eval score), which credits a model that answers right without the tags.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Callable, Sequence

import numpy as np

from longrl_jax.data.longvideo_reason import options_in_text
from longrl_jax.rl.rollouts import sample_and_score

# The rollout server seeds prompt i of a request with seed + i * SEED_STRIDE
# (rollout_server/service.py); a batch that starts at question j is sent seed + j * SEED_STRIDE,
# so question j samples with the same seed however the questions are batched (and on a resume).
SEED_STRIDE = 1_000_003


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a question set is answered. `num_frames` / `fps` (with `max_frames`) choose the
    frames; they belong to the prompts' video embeddings, and are recorded here so that a report
    says what it was measured with (`None`: the run's sampling)."""
    max_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    thinking: bool = True
    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    seed: int = 0
    batch: int = 16

    def __post_init__(self):
        if self.n < 1 or self.batch < 1 or self.max_tokens < 1:
            raise ValueError(f"n, batch and max_tokens must be positive: {self}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @classmethod
    def of_config(cls, config) -> "EvalSettings":
        """The run's evaluation settings: `config.eval`, the run's thinking and frames."""
        e, d = config.eval, config.data
        num_frames = e.get("num_frames", 0) or d.num_frames
        return cls(max_tokens=e.max_tokens, temperature=e.temperature, n=e.get("n", 1),
                   thinking=bool(config.thinking), num_frames=num_frames,
                   fps=None if num_frames else d.fps,
                   max_frames=None if num_frames else d.max_frames, seed=config.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ================================================================================================
# Lenient letter extraction
# ================================================================================================

_LETTERS = "ABCDEFGH"
_ANSWER_SPAN = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_PREFIXES = ("the best answer is", "the correct answer is", "the answer is", "the answer",
             "the best option is", "the correct option is", "best answer:", "best option:",
             "answer:", "option")


def lenient_letter(response: str, num_options: int = 4) -> str:
    """The option letter a reply names, read leniently: inside the `<answer>` span if there is
    one (closed or not), else after `</think>` if present, else the whole reply; answer
    prefixes ("The answer is") removed; the first letter among the `num_options` that stands
    alone ("B", "(B)", "B.", "B)") is the answer; "" if none (lmms-eval's Video-MME extraction,
    with the tags understood)."""
    m = _ANSWER_SPAN.search(response)
    text = m.group(1) if m else response.rsplit("</think>", 1)[-1]
    low = text.strip()
    for p in _PREFIXES:
        low = re.sub(re.escape(p), " ", low, flags=re.IGNORECASE)
    letters = _LETTERS[:max(1, min(num_options, len(_LETTERS)))]
    hit = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", low)
    return hit.group(1) if hit else ""


def num_options(problem: str) -> int:
    """How many lettered options a multiple-choice problem lists (4 when it lists none)."""
    return len(options_in_text(problem)) or 4


# ================================================================================================
# Answering and scoring
# ================================================================================================

def _runs(indices: Sequence[int]) -> list[list[int]]:
    """Consecutive indices grouped: [0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][-1] + 1 == i:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def question_record(index: int, prompt, texts: list[str], scores: list[dict]) -> dict:
    """One question's responses and scores (JSON-ready): per sample, the original scorer's
    accuracy, the lenient letter's, and the format."""
    ex = prompt.example
    mcq = ex.problem_type == "multiple_choice"
    count = num_options(ex.problem) if mcq else 0
    letters = [lenient_letter(t, count) for t in texts] if mcq else []
    lenient = [float(lt == ex.answer) for lt in letters] if mcq else \
        [float(s["accuracy"]) for s in scores]
    rec = {"index": index, "problem_id": ex.problem_id, "category": ex.category or "all",
           "problem_type": ex.problem_type, "answer": ex.answer, "responses": list(texts),
           "accuracy": [float(s["accuracy"]) for s in scores], "lenient": lenient,
           "format": [float(s["format"]) for s in scores]}
    if mcq:
        rec["lenient_letters"] = letters
    errors = [s["judge_error"] for s in scores if "judge_error" in s]
    if errors:
        rec["judge_errors"] = errors
    return rec


def answer_questions(connection, prompts, tokenizer, tokens, settings: EvalSettings, *,
                     judge=None, indices: Sequence[int] | None = None,
                     on_records: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """A `question_record` per prompt (or per prompt at `indices`, for a resumed run), `n`
    samples each, `settings.batch` questions per request; `on_records(records)` is called after
    each request (the tool appends them to its responses file there)."""
    indices = list(range(len(prompts))) if indices is None else sorted(indices)
    out = []
    for run in _runs(indices):
        for k in range(0, len(run), settings.batch):
            idx = run[k:k + settings.batch]
            r = sample_and_score(connection, [prompts[i] for i in idx], n=settings.n,
                                 tokenizer=tokenizer, tokens=tokens, judge=judge,
                                 max_tokens=settings.max_tokens,
                                 temperature=settings.temperature, top_p=settings.top_p,
                                 seed=settings.seed + idx[0] * SEED_STRIDE)
            recs = []
            for g, i in enumerate(idx):
                rows = np.flatnonzero(r.group_ids == g)
                recs.append(question_record(i, prompts[i], [r.texts[j] for j in rows],
                                            [r.scores[j] for j in rows]))
            if on_records is not None:
                on_records(recs)
            out += recs
    return out


# ================================================================================================
# Aggregation
# ================================================================================================

def _means(records: list[dict]) -> dict:
    q = lambda key: [float(np.mean(r[key])) for r in records]  # noqa: E731 -- per question
    return {"n": len(records),
            "accuracy": float(np.mean(q("accuracy"))) if records else 0.0,
            "lenient_accuracy": float(np.mean(q("lenient"))) if records else 0.0,
            "format": float(np.mean(q("format"))) if records else 0.0}


def summarize(records: list[dict], keep_samples: int = 8, group_by: str = "category") -> dict:
    """{"accuracy", "lenient_accuracy", "format", "n", "per_category": {name: {"n",
    "accuracy", "lenient_accuracy", "format"}}, "samples": [first few]}: each question weighs
    once, its accuracy the mean over its `n` samples."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[r.get(group_by) or "all"].append(r)
    samples = [{"problem_id": r["problem_id"], "answer": r["answer"], "response": t,
                "accuracy": a, "format": f}
               for r in records[:keep_samples]
               for t, a, f in list(zip(r["responses"], r["accuracy"], r["format"]))[:1]]
    return {**_means(records), "per_category": {k: _means(v) for k, v in sorted(groups.items())},
            "samples": samples}


def evaluate(connection, prompts, tokenizer, tokens, settings: EvalSettings, *,
             judge=None) -> dict:
    """Every prompt answered and scored (`answer_questions`), summarized (`summarize`)."""
    return summarize(answer_questions(connection, prompts, tokenizer, tokens, settings,
                                      judge=judge))


class Evaluator:
    """A run's held-out set (prompts built once, at the evaluation's frames) and how it is
    evaluated: what `main`'s eval stage and the RL trainer's periodic evaluation both call."""

    def __init__(self, ctx, connection):
        self.ctx = ctx
        self.connection = connection
        self.settings = EvalSettings.of_config(ctx.config)
        self._prompts = None

    @property
    def prompts(self):
        if self._prompts is None:
            frames = self.ctx.config.eval.get("num_frames", 0)
            self._prompts = self.ctx.prompts(self.ctx.eval_examples(), num_frames=frames)
        return self._prompts

    def __call__(self) -> dict:
        return evaluate(self.connection, self.prompts, self.ctx.tokenizer, self.ctx.tokens,
                        self.settings, judge=self.ctx.judge)


# ================================================================================================
# The policy to evaluate
# ================================================================================================

def load_policy(*, workdir: str | None = None, checkpoint: str | None = None, mesh=None,
                rules=None):
    """(model, tokenizer_dir). `workdir`: the newest trained policy of a run (the final RL
    params, else the newest RL checkpoint over the final SFT params, else the final SFT params)
    and the run's tokenizer. `checkpoint`: an HF export or a LongVILA / Qwen checkpoint
    directory (or a params directory), its tokenizer beside the LLM weights. ValueError or
    FileNotFoundError says what is missing."""
    from longrl_jax import checkpoint as ckpt_lib
    from longrl_jax.models import hf
    if bool(workdir) == bool(checkpoint):
        raise ValueError("give exactly one of a run's workdir and a checkpoint directory")
    kw = dict(mesh=mesh, rules=rules)
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"{checkpoint}: no such directory")
        model = ckpt_lib.load_params(checkpoint, **kw) if ckpt_lib.is_params_dir(checkpoint) \
            else hf.load_pretrained(checkpoint, **kw)
        tok = next((d for d in (os.path.join(checkpoint, "llm"), checkpoint)
                    if os.path.exists(os.path.join(d, "tokenizer_config.json"))), None)
        return model, tok
    params = lambda stage: os.path.join(workdir, "params", stage)  # noqa: E731
    tok = os.path.join(workdir, "tokenizer")
    tok = tok if os.path.isdir(tok) else None
    if ckpt_lib.is_params_dir(params("rl")):
        return ckpt_lib.load_params(params("rl"), **kw), tok
    base = next((params(s) for s in ("sft", "initial") if ckpt_lib.is_params_dir(params(s))),
                None)
    if base is None:
        raise ValueError(f"{workdir}: no trained params (params/rl or params/sft)")
    model = ckpt_lib.load_params(base, **kw)
    rl_dir = os.path.join(workdir, "checkpoints", "rl")
    if os.path.isdir(rl_dir):
        with ckpt_lib.TrainCheckpointer(rl_dir) as ckpt:
            if ckpt.latest_step() is not None:
                ckpt.restore(model=model)
    return model, tok
