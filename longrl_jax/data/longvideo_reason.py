"""LongVideo-Reason data: JSONL rows -> validated examples -> prompts and CoT-SFT targets;
a TFDS builder that writes array_record files (no TensorFlow), read by grain.

A row: `problem`, `answer` ("B", "<answer>B</answer>", "B. text", or free text), `videos` (a
path or list of paths relative to the video dir), optional `reasoning`, `problem_type` (any
spelling: "multiple choice", "multiple_choice", "general", "open-ended", ...), `data_type`,
`problem_id`, `options` (a list, lettered or not, when the options are not already in the
problem text as "A." / "A)" / "(A)"), `category`. Released LongVideo-Reason rows say "general"
and write the options into the problem: multiple choice is recognised from the options and the
answer, not from the type string. Every bad row is skipped with its reason in a `Report`;
nothing is substituted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import re
from typing import Iterable, Iterator

from longrl_jax.data.frames import VideoError, video_info

log = logging.getLogger(__name__)

VIDEO_TOKEN = "<video>"
SYSTEM_THINKING = ("You are given a video. Answer the question about it. Think step by step "
                   "inside <think> </think> tags, then give the final answer inside <answer> "
                   "</answer> tags.")
SYSTEM_NON_THINKING = ("You are given a video. Answer the question about it. Give the final "
                       "answer inside <answer> </answer> tags.")
MCQ_SUFFIX = "For a multiple choice question answer with the option letter only."
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_LETTERS = "ABCDEFGH"
# An option letter opening a line or following whitespace: "A. x", "A) x", "(A) x", "A: x".
_OPTION_MARK = r"(?:^|(?<=\s))(?:\(([A-H])\)|([A-H])[.):])(?=\s|$)"
_LETTERED = re.compile(r"^\s*(?:\(([A-H])\)|([A-H])[.):])\s*(.*)$", re.DOTALL)
_TYPES = {"multiplechoice": "multiple_choice", "mcq": "multiple_choice",
          "multichoice": "multiple_choice", "choice": "multiple_choice",
          "openended": "open_ended", "open": "open_ended", "freeform": "open_ended",
          "freetext": "open_ended", "openqa": "open_ended", "shortanswer": "open_ended"}


def normalise_type(name: object) -> str | None:
    """"multiple_choice" / "open_ended" for any spelling of either, else None (e.g. "general",
    which says nothing about the form of the answer)."""
    if not isinstance(name, str):
        return None
    return _TYPES.get(re.sub(r"[\s_\-]+", "", name.lower()))


def options_in_text(problem: str) -> list[str]:
    """The option letters written into the problem, in order, if they run A, B, C... (at least
    two), else []."""
    letters = [a or b for a, b in re.findall(_OPTION_MARK, problem, flags=re.MULTILINE)]
    run = []
    for x in letters:
        if x == _LETTERS[len(run)]:
            run.append(x)
    return run if len(run) >= 2 else []


def _option_texts(options: object) -> list[str]:
    """An options list as bare texts: a consistently lettered list ("A. x", "(B) y") loses its
    letters, so that each is lettered once."""
    if not isinstance(options, list) or not options or \
            not all(isinstance(o, str) and o.strip() for o in options):
        raise RowError("options is not a non-empty list of non-empty strings")
    if len(options) > len(_LETTERS):
        raise RowError(f"{len(options)} options; at most {len(_LETTERS)} are supported")
    marks = [_LETTERED.match(o) for o in options]
    if all(m and (m.group(1) or m.group(2)) == _LETTERS[i] for i, m in enumerate(marks)):
        return [m.group(3).strip() for m in marks]
    return [o.strip() for o in options]


def answer_letter(answer: str, count: int, texts: list[str] | None = None) -> str | None:
    """The option letter an answer names: "B", "B. text", "(B)", "B) text", or an option's
    exact text; None if it names none of the `count` options."""
    m = re.fullmatch(r"\(?([A-Ha-h])\)?(?:[.):]\s*.*)?", answer.strip(), flags=re.DOTALL)
    if m and _LETTERS.index(m.group(1).upper()) < count:
        return m.group(1).upper()
    if texts:
        norm = [t.strip().rstrip(".").lower() for t in texts]
        key = answer.strip().rstrip(".").lower()
        if key in norm:
            return _LETTERS[norm.index(key)]
    return None


class RowError(ValueError):
    """A row that cannot be used; the message is the reason reported."""


@dataclasses.dataclass(frozen=True)
class Example:
    problem_id: str
    problem: str                 # question text, with options listed for MCQ
    answer: str                  # bare: "B", or the open-ended reference text
    videos: tuple[str, ...]      # absolute paths
    problem_type: str            # "multiple_choice" | "open_ended"
    reasoning: str = ""
    category: str = ""

    def messages(self, thinking: bool = True) -> list[dict]:
        user = f"{VIDEO_TOKEN}\n{self.problem}"
        if self.problem_type == "multiple_choice":
            user += f"\n{MCQ_SUFFIX}"
        return [{"role": "system", "content": SYSTEM_THINKING if thinking else SYSTEM_NON_THINKING},
                {"role": "user", "content": user}]

    def sft_target(self) -> str:
        """The CoT-SFT completion: `<think>reasoning</think><answer>X</answer>`."""
        return f"<think>{self.reasoning}</think><answer>{self.answer}</answer>"


@dataclasses.dataclass
class Report:
    read: int = 0
    kept: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)

    def skip(self, row: int, reason: str) -> None:
        log.warning("skipping row %d: %s", row, reason)
        self.skipped.append({"row": row, "reason": reason})

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": self.skipped}


def strip_answer(answer: str) -> str:
    m = _ANSWER_TAG.search(answer)
    return (m.group(1) if m else answer).strip()


def _video_path(rel: object, video_dir: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise RowError(f"video path {rel!r} is not a non-empty string")
    root = os.path.realpath(video_dir)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([root, path]) != root:
        raise RowError(f"video path {rel!r} escapes the video dir")
    return path


def parse_row(row: str | dict, video_dir: str, *, check_videos: bool = True,
              index: int = 0) -> Example:
    """One validated Example, or RowError with the reason; `row` is a dict or its JSON line."""
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise RowError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise RowError(f"row is a JSON {type(row).__name__}, not an object")
    for field in ("problem", "answer", "videos"):
        if field not in row:
            raise RowError(f"missing field {field!r}")
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        raise RowError("problem is not a non-empty string")
    if not isinstance(row["answer"], str):
        raise RowError(f"answer is a {type(row['answer']).__name__}, not a string")
    answer = strip_answer(row["answer"])
    if not answer:
        raise RowError("answer is empty")
    videos = row["videos"] if isinstance(row["videos"], list) else [row["videos"]]
    if not videos:
        raise RowError("videos is empty")
    paths = tuple(_video_path(v, video_dir) for v in videos)
    if check_videos:
        for p in paths:
            try:
                frames, _ = video_info(p)
            except VideoError as e:
                raise RowError(str(e)) from None
            if frames <= 0:
                raise RowError(f"video {p} has no frames")
    problem = row["problem"].strip()
    declared = normalise_type(row.get("problem_type"))
    in_text = options_in_text(problem)
    texts = None
    if row.get("options") is not None and not in_text:
        texts = _option_texts(row["options"])
        problem += "\nOptions:\n" + "\n".join(f"{_LETTERS[i]}. {t}" for i, t in enumerate(texts))
    count = len(in_text) if in_text else len(texts or [])
    letter = answer_letter(answer, count, texts) if count else None
    if count and declared != "open_ended":
        if letter is None:
            raise RowError(f"multiple-choice answer {answer!r} names none of the {count} options")
        ptype, answer = "multiple_choice", letter
    elif declared == "multiple_choice" or (declared is None and re.fullmatch(r"[A-H]", answer)):
        bare = answer_letter(answer, len(_LETTERS))
        if bare is None:
            raise RowError(f"multiple-choice answer {answer!r} is not an option letter")
        ptype, answer = "multiple_choice", bare   # options named elsewhere (e.g. a list field)
    else:
        ptype = "open_ended"
    reasoning = row.get("reasoning") or ""
    if not isinstance(reasoning, str):
        raise RowError("reasoning is not a string")
    return Example(problem_id=str(row.get("problem_id", index)), problem=problem, answer=answer,
                   videos=paths, problem_type=ptype, reasoning=reasoning.strip(),
                   category=str(row.get("category") or row.get("problem_type") or ""))


def read_jsonl(path: str, video_dir: str, report: Report | None = None, *,
               check_videos: bool = True) -> Iterator[tuple[int, Example]]:
    """(row index, Example) for every good row; bad rows go to `report` with their reason."""
    report = report if report is not None else Report()
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            report.read += 1
            try:
                ex = parse_row(line, video_dir, check_videos=check_videos, index=i)
            except RowError as e:
                report.skip(i, str(e))
                continue
            report.kept += 1
            yield i, ex


# ----------------------------------------------------------------------- TFDS + grain
@functools.lru_cache(maxsize=None)  # TFDS registers builder classes by name: define it once
def _builder_class():
    import tensorflow_datasets as tfds

    class LongVideoReason(tfds.core.GeneratorBasedBuilder):
        """Validated LongVideo-Reason examples as array_record; one JSON text per example."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, splits: dict[str, str], video_dir: str, **kw):
            self._splits = splits
            self._video_dir = video_dir
            self.report: dict[str, Report] = {}
            super().__init__(**kw)

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({"example": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {name: self._generate_examples(name, path)
                    for name, path in self._splits.items()}

        def _generate_examples(self, split, path):
            report = self.report.setdefault(split, Report())
            for i, ex in read_jsonl(path, self._video_dir, report):
                yield f"{i}", {"example": json.dumps(dataclasses.asdict(ex))}

    return LongVideoReason


def build_array_records(data_dir: str, splits: dict[str, str], video_dir: str) -> dict:
    """Writes `data_dir/long_video_reason/1.0.0/*.array_record`; returns the per-split report."""
    builder = _builder_class()(splits=splits, video_dir=video_dir, data_dir=data_dir,
                               file_format="array_record")
    # TFDS prints its "Downloading and preparing dataset ..." lines; they belong in the log.
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        builder.download_and_prepare()
    for line in printed.getvalue().splitlines():
        log.info("tfds: %s", line)
    with open(os.path.join(builder.data_dir, "report.json"), "w") as f:
        json.dump({k: v.to_dict() for k, v in builder.report.items()}, f, indent=1)
    return {k: v.to_dict() for k, v in builder.report.items()}


def data_source(data_dir: str, split: str, splits: dict[str, str] | None = None,
                video_dir: str = ""):
    """The random-access array_record source of a built split (grain reads it)."""
    builder = _builder_class()(splits=splits or {}, video_dir=video_dir, data_dir=data_dir,
                               file_format="array_record")
    return builder.as_data_source()[split]


def decode(record) -> Example:
    d = json.loads(record["example"])
    d["videos"] = tuple(d["videos"])
    return Example(**d)


def loader(source, *, seed: int, shuffle: bool = True, num_epochs: int | None = 1,
           shard_index: int | None = None, shard_count: int | None = None):
    """A grain DataLoader over `source` yielding Examples, sharded across hosts (JAX process
    index/count by default), with checkpointable iterator state (`get_state`/`set_state`)."""
    import grain
    import jax

    shard = grain.sharding.ShardOptions(
        shard_index=jax.process_index() if shard_index is None else shard_index,
        shard_count=jax.process_count() if shard_count is None else shard_count,
        drop_remainder=False)
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard,
                                          shuffle=shuffle, num_epochs=num_epochs, seed=seed)

    class Decode(grain.transforms.Map):
        def map(self, record):
            return decode(record)

    return grain.DataLoader(data_source=source, sampler=sampler, operations=[Decode()],
                            worker_count=0)


def examples(path: str, video_dir: str, **kw) -> Iterable[Example]:
    return (ex for _, ex in read_jsonl(path, video_dir, **kw))


__all__ = ["Example", "Report", "RowError", "answer_letter", "build_array_records",
           "data_source", "decode", "examples", "loader", "normalise_type", "options_in_text",
           "parse_row", "read_jsonl", "strip_answer"]
