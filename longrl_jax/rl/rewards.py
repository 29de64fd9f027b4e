"""Rewards: Long-RL's rule reward (r1v) and an LLM judge for open-ended answers.

`compute_score` reproduces Long-RL's examples/reward_function/r1v.py, together with the
ground-truth unwrapping its dataset loader does (verl/utils/dataset.py), so that a row's
`answer` may be given with or without its `<answer>` tags.

`Judge` asks an OpenAI-compatible chat endpoint whether an answer matches the reference (Long-RL
uses gpt-4o-mini for open-ended questions). Unlike the original, it is off unless configured,
is chosen per question type, has timeouts, retries and bounded concurrency, and never raises:
a call that still fails after its retries scores accuracy 0, carries `judge_error`, and is
counted in `Judge.failures`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from mathruler.grader import grade_answer

log = logging.getLogger(__name__)

FORMAT_WEIGHT = 0.1
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A "." that is not a decimal point: not followed by a digit.
_SENTENCE_DOT = re.compile(r"\.(?!\d)")

# ==============================================================================================
# Rule reward (r1v)
# ==============================================================================================


def format_reward(response: str) -> float:
    """1.0 iff the whole response is `<think>…</think>` then `<answer>…</answer>`."""
    return 1.0 if _FORMAT.fullmatch(response) else 0.0


def unwrap_answer(text: str) -> str:
    """The first `<answer>` group if there is one, else the text; stripped.

    Long-RL's loader takes the group with a case-sensitive search (and crashes on an unclosed
    tag); here an unclosed or absent tag leaves the text as it is.
    """
    m = _ANSWER.search(text)
    return (m.group(1) if m else text).strip()


def extract_given_answer(response: str, *, cut_at_period: bool = True) -> str:
    """The answer r1v grades: from the response with every space and newline removed, the first
    `<answer>` group, stripped; with no such group, the original response stripped (spaces kept,
    as r1v does).

    By default (`cut_at_period=True`) the answer is kept up to its first ".", as Long-RL's newest
    r1v.py does (since its commit 16f5e31), so "B.explanation" -> "B" (docs/REFERENCE.md, "Rule
    reward (r1v)"). Cutting literally at the first "." would turn "3.5" into "3", scoring it
    right against ground truth "3" and wrong against "3.5" (the original's defect); so the cut
    skips a "." followed by a digit: "3.5" and ".5" stay whole, "3.5.Because" -> "3.5",
    "B." -> "B".

    `cut_at_period=False` is the July 2025 snapshot of r1v.py: nothing is cut,
    `<answer> B. explanation </answer>` becomes "B.explanation", which mathruler does not equal
    to "B" (accuracy 0).
    """
    m = _ANSWER.search(response.replace("\n", "").replace(" ", ""))
    given = m.group(1).strip() if m else response.strip()
    if cut_at_period:
        given = _SENTENCE_DOT.split(given, maxsplit=1)[0].strip()
    return given


@functools.lru_cache(maxsize=1 << 16)
def _grade(given: str, truth: str) -> bool:
    """mathruler's grade_answer, memoised: a wrong letter goes through sympy, which is slow
    (measured in bench/RESULTS.md, "The demo's RL step"), and a multiple-choice batch asks the
    same few pairs again and again."""
    return grade_answer(given, truth)


def accuracy_reward(response: str, ground_truth: str, *, cut_at_period: bool = True) -> float:
    """1.0 if mathruler's `grade_answer` equates the given answer and the ground truth.

    grade_answer compares normalised strings (case-insensitive: "b" equals "B"), then by value
    with sympy ("3.0" = "3", "1/2" = "0.5" = "\\frac{1}{2}"). Any exception scores 0, as in r1v.
    """
    try:
        given = extract_given_answer(response, cut_at_period=cut_at_period)
        return 1.0 if _grade(given, unwrap_answer(ground_truth)) else 0.0
    except Exception as e:  # noqa: BLE001 -- sympy can raise anything on odd input
        log.debug("grade_answer raised %r on %r", e, response[-200:])
        return 0.0


def compute_score(response: str, ground_truth: str, *, cut_at_period: bool = True
                  ) -> dict[str, float]:
    """Long-RL's r1v reward: overall = 0.9·accuracy + 0.1·format."""
    fmt = format_reward(response)
    acc = accuracy_reward(response, ground_truth, cut_at_period=cut_at_period)
    return {"overall": (1 - FORMAT_WEIGHT) * acc + FORMAT_WEIGHT * fmt, "accuracy": acc,
            "format": fmt}


# ==============================================================================================
# LLM judge for open-ended answers
# ==============================================================================================

DEFAULT_PROMPT = (
    "You are grading an answer to a question about a video.\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Model answer: {response}\n"
    "Does the model answer mean the same as the reference answer? Reply with Yes or No only."
)


class JudgeError(Exception):
    """One failed judge attempt; the message is the reason recorded."""

    def __init__(self, reason: str, retry: bool = True):
        super().__init__(reason)
        self.retry = retry


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask. `url` is a base ("http://host:8000", ".../v1") or the full
    `/v1/chat/completions` address. The API key is read from the environment variable
    `api_key_env` at call time (never stored); unset or empty sends no Authorization header.
    `timeout_s` bounds each socket operation of one attempt; an attempt that fails is retried
    up to `max_retries` times, sleeping backoff_s·2^k before retry k+1. At most
    `max_concurrency` requests are in flight per Judge, across all threads. `prompt_template`
    is formatted with {question}, {response} and {reference} (literal braces doubled)."""

    url: str
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 1.0
    max_concurrency: int = 8
    prompt_template: str = DEFAULT_PROMPT
    max_tokens: int = 8

    def __post_init__(self):
        if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError(f"bad judge limits: {self}")
        self.prompt_template.format(question="", response="", reference="")  # fail early

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class Judge:
    """Scores open-ended answers with an LLM; thread-safe; `failures` counts failed items."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.failures = 0
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(config.max_concurrency)

    def score(self, question: str, response: str, reference: str) -> dict:
        """{"overall", "accuracy", "format"} like compute_score, accuracy from the judge; plus
        "judge_error" when the judge could not be asked."""
        fmt = format_reward(response)
        try:
            acc = self._ask(question, unwrap_answer(response), unwrap_answer(reference))
            out = {"accuracy": acc}
        except Exception as e:  # noqa: BLE001 -- scoring must never take training down
            with self._lock:
                self.failures += 1
            log.warning("judge failed: %s", e)
            out = {"accuracy": 0.0, "judge_error": str(e) or type(e).__name__}
        out["format"] = fmt
        out["overall"] = (1 - FORMAT_WEIGHT) * out["accuracy"] + FORMAT_WEIGHT * fmt
        return out

    def score_many(self, items: Sequence) -> list[dict]:
        """score() for each (question, response, reference) tuple or mapping with those keys,
        in order, up to max_concurrency at a time."""
        rows = [(it["question"], it["response"], it["reference"]) if isinstance(it, Mapping)
                else tuple(it) for it in items]
        if not rows:
            return []
        workers = min(self.config.max_concurrency, len(rows))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda row: self.score(*row), rows))

    # ------------------------------------------------------------------------------------------

    def _ask(self, question: str, answer: str, reference: str) -> float:
        cfg = self.config
        prompt = cfg.prompt_template.format(question=question, response=answer,
                                            reference=reference)
        body = json.dumps({"model": cfg.model, "temperature": 0.0, "max_tokens": cfg.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        for attempt in range(cfg.max_retries + 1):
            try:
                with self._slots:
                    reply = self._post(body)
                return 1.0 if reply.strip().lower().startswith("yes") else 0.0
            except JudgeError as e:
                if not e.retry or attempt == cfg.max_retries:
                    raise
                log.info("judge attempt %d failed (%s); retrying", attempt + 1, e)
                time.sleep(cfg.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> str:
        """One request; the reply text, or JudgeError with the reason."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env or "", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.config.endpoint, data=body, headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read(200).decode("utf-8", "replace")
            # 429 and 5xx can pass; other 4xx (bad key, bad model, bad url) will not.
            raise JudgeError(f"HTTP {e.code}: {detail}",
                             retry=e.code == 429 or e.code >= 500) from None
        except TimeoutError:
            raise JudgeError(f"timeout after {self.config.timeout_s} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise JudgeError(f"timeout after {self.config.timeout_s} s") from None
            raise JudgeError(f"connection error: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:
            raise JudgeError(f"connection error: {e!r}") from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise JudgeError(f"malformed JSON reply: {raw[:200]!r}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"no choices[0].message.content in reply: {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise JudgeError(f"reply content is {type(content).__name__}, not text")
        return content


# ==============================================================================================
# Batch scoring by question type
# ==============================================================================================

JUDGED_TYPES = frozenset({"open ended", "free form"})


def normalize_problem_type(problem_type: str | None) -> str:
    """"open_ended", "Open-Ended" and "open ended" are one type: lower case, spaces."""
    return re.sub(r"[\s_-]+", " ", (problem_type or "").strip().lower())


def score_batch(responses: Sequence[str], ground_truths: Sequence[str],
                problem_types: Sequence[str | None], *, judge: Judge | None = None,
                questions: Sequence[str] | None = None, cut_at_period: bool = True
                ) -> list[dict]:
    """One score dict per response, in order.

    Open-ended and free-form questions (LongVideo-Reason's "open-ended", our data's
    "open_ended") go to `judge` when one is given, with `questions` in its prompt. Everything
    else -- multiple choice, numerical, OCR, regression, unknown types -- and open-ended
    questions when there is no judge, get the rule reward: mathruler's equality is exact for
    letters and numbers, and for free text it is a whitespace- and case-insensitive string
    match (the original's behaviour with its judge off).
    """
    n = len(responses)
    if len(ground_truths) != n or len(problem_types) != n or (questions and len(questions) != n):
        raise ValueError("responses, ground_truths, problem_types (and questions) differ in length")
    judged = [i for i in range(n) if judge is not None
              and normalize_problem_type(problem_types[i]) in JUDGED_TYPES]
    out: list[dict | None] = [None] * n
    if judged:
        items = [((questions[i] if questions else ""), responses[i], ground_truths[i])
                 for i in judged]
        for i, score in zip(judged, judge.score_many(items)):
            out[i] = score
    for i in range(n):
        if out[i] is None:
            out[i] = compute_score(responses[i], ground_truths[i], cut_at_period=cut_at_period)
    return out
