"""Video-MME in lmms-eval's layout: questions as Examples, subtitles near the sampled frames.

A row (parquet, JSON list or JSONL): `videoID` (the video file's stem in the video dir),
`question_id`, `duration` (short / medium / long), `domain`, `task_type`, `question`, `options`
(["A. ...", "B. ...", ...]) and `answer` (a letter). Rows become multiple-choice `Example`s
through `longvideo_reason.parse_row`, so every option reaches the prompt exactly once and a bad
row is reported with its reason, never dropped silently. The category is `task_type`;
`duration` and `domain` travel beside the example for the per-duration table.

With subtitles (`.srt` per video, named by `videoID`), the lines shown at the sampled frames'
times are put before the question, as lmms-eval's `videomme_doc_to_text_subtitle` does: a
subtitle is kept when a sampled frame falls inside its time span, each line once, in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data.frames import Sampling, VideoError, sample_indices, video_info

VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi")
SUBTITLE_HEADER = "This video's subtitles are listed below:"
NO_SUBTITLES = "No subtitles available"
_TIME = re.compile(r"(\d+):(\d+):(\d+)[,.](\d+)")


@dataclasses.dataclass(frozen=True)
class Item:
    """One Video-MME question: its Example and the fields the report groups by."""
    index: int
    example: lvr.Example
    duration: str
    domain: str
    video_id: str


def read_rows(path: str) -> list[dict]:
    """The file's rows: parquet (needs pandas and pyarrow), a JSON list, or JSONL."""
    if path.endswith(".parquet"):
        try:
            import pandas as pd
        except ImportError:
            raise SystemExit(f"{path}: reading parquet needs pandas and pyarrow "
                             "(pip install pandas pyarrow), or give the rows as JSON/JSONL") \
                from None
        rows = pd.read_parquet(path).to_dict(orient="records")
        return [{k: (list(v) if isinstance(v, np.ndarray) else v) for k, v in r.items()}
                for r in rows]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"malformed JSON on line {i + 1} ({e.msg})"})
    return rows


def find_video(video_dir: str, video_id: str) -> str | None:
    """The video file of `video_id` (relative to `video_dir`), trying the usual extensions."""
    for ext in VIDEO_EXTENSIONS:
        if os.path.exists(os.path.join(video_dir, video_id + ext)):
            return video_id + ext
    return None


def parse(row: dict, video_dir: str, *, index: int = 0, check_videos: bool = True) -> Item:
    """One Video-MME row as an Item, or lvr.RowError with the reason."""
    if "__error__" in row:
        raise lvr.RowError(row["__error__"])
    for field in ("videoID", "question", "options", "answer"):
        if field not in row or row[field] is None:
            raise lvr.RowError(f"missing field {field!r}")
    video_id = str(row["videoID"])
    rel = find_video(video_dir, video_id)
    if rel is None:
        raise lvr.RowError(f"no video {video_id}.mp4 (or .mkv, .webm) in {video_dir}")
    options = row["options"]
    if isinstance(options, str):
        options = [o for o in options.splitlines() if o.strip()]
    ex = lvr.parse_row({"problem": str(row["question"]), "options": list(options),
                        "answer": str(row["answer"]), "videos": rel,
                        "problem_type": "multiple choice",
                        "problem_id": str(row.get("question_id", index)),
                        "category": str(row.get("task_type") or "")},
                       video_dir, check_videos=check_videos, index=index)
    return Item(index=index, example=ex, duration=str(row.get("duration") or ""),
                domain=str(row.get("domain") or ""), video_id=video_id)


def read(path: str, video_dir: str, report: lvr.Report | None = None, *,
         check_videos: bool = True) -> list[Item]:
    """Every good row as an Item; bad rows go to `report` with their reason."""
    report = report if report is not None else lvr.Report()
    items = []
    for i, row in enumerate(read_rows(path)):
        report.read += 1
        try:
            if not isinstance(row, dict):
                raise lvr.RowError(f"row is a {type(row).__name__}, not an object")
            items.append(parse(row, video_dir, index=i, check_videos=check_videos))
        except lvr.RowError as e:
            report.skip(i, str(e))
            continue
        report.kept += 1
    return items


# ================================================================================================
# Subtitles
# ================================================================================================

def _seconds(stamp: str) -> float:
    h, m, s, ms = (int(x) for x in _TIME.fullmatch(stamp.strip()).groups())
    return h * 3600 + m * 60 + s + ms / 1000.0


def read_srt(path: str) -> list[tuple[float, float, str]]:
    """(start s, end s, text) of every cue of an .srt file, text lines joined by a space."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        blocks = re.split(r"\n\s*\n", f.read().replace("\r\n", "\n").strip())
    cues = []
    for block in blocks:
        lines = [l for l in block.splitlines() if l.strip()]
        at = next((k for k, l in enumerate(lines) if "-->" in l), None)
        if at is None:
            continue
        start, _, end = lines[at].partition("-->")
        try:
            span = (_seconds(start), _seconds(end.split()[0]))
        except (AttributeError, IndexError):
            continue
        text = " ".join(l.strip() for l in lines[at + 1:])
        text = re.sub(r"<[^>]+>", "", text).strip()     # <i>, <font ...>
        if text:
            cues.append((*span, text))
    return cues


def subtitles_at(cues: list[tuple[float, float, str]], times_s: np.ndarray) -> list[str]:
    """The cue texts shown at any of `times_s` (start <= t < end), each once, in cue order."""
    return [text for start, end, text in cues
            if np.any((times_s >= start) & (times_s < end))]


def with_subtitles(example: lvr.Example, srt_path: str | None, sampling: Sampling) -> lvr.Example:
    """`example` with the subtitle lines near its sampled frames before the question
    (lmms-eval's prompt), or NO_SUBTITLES when the video has no .srt."""
    lines: list[str] = []
    if srt_path and os.path.exists(srt_path):
        total, fps = video_info(example.videos[0])
        if not fps or fps <= 0:
            raise VideoError(f"{example.videos[0]} reports fps={fps}: no frame times")
        times = sample_indices(total, fps, sampling) / fps
        lines = subtitles_at(read_srt(srt_path), times)
    block = "\n".join(lines) if lines else NO_SUBTITLES
    return dataclasses.replace(example, problem=f"{SUBTITLE_HEADER}\n{block}\n{example.problem}")
