"""A synthetic long-video reasoning suite: real H.264 videos with questions whose answers need
frames far apart. The embedded default dataset of `make demo`.

Each video is a gray field on which coloured objects appear, each filling one quadrant, for a
few frames at a time. The first and last 10% of every video are empty, so nothing can be read
off the first or last frames. Four question types, modelled on LongVideo-Reason-eval's
categories:

  temporal  two objects appear far apart (one in the first half, one in the second): which
            appeared first?
  counting  one object flashes 1-4 times across the whole video, among distractors: how many?
  spatial   where (which quadrant) was the object of a given colour?
  needle    one object appears once, briefly, in the middle third: what colour was it?

Events last just long enough that uniform sampling of `sample_frames` frames (default: all)
always sees them. Every question has four options (A-D) with the correct letter cycling through
A-D, so answers are exactly balanced and chance is 25%; an open-ended variant asks the same
without options.

`options="shuffled"` (the default) lists the wrong options in random order, so the answer
letter can only be found by matching the evidence to the option text. `options="ordered"` lists
each category's options in one fixed order (the quadrants in reading order, the counts 1-4, four
needle colours, and for temporal: first-named, second-named, "same time", "neither"), and the
video is drawn so the answer is the one at the cycling letter; all four temporal outcomes
happen. The letter then follows from the video alone. `distractors=False` (ordered only) also
drops the other objects from counting and spatial questions, so those need one look at the
video rather than two (find the named object, then read it): what a 2-layer model trained from
scratch learns within the demo's CPU budget. `traces="brief"` (ordered only) writes reasoning
that states the evidence without frame numbers ("The green circle is in the top left."): the
frame numbers are most of a trace's tokens and hard to predict from 16 sampled frames, so in RL
their sampling noise drowns the few tokens the reward depends on.

Reasoning traces (other than brief ones) cite the frames where the evidence is. Rows follow the
LongVideo-Reason format (`problem`, `answer`, `videos`, `reasoning`, `problem_type`, `data_type`,
`problem_id`) plus `category` and `meta` (the events, for tests). Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator

import numpy as np

from longrl_jax.data.frames import write_video

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
          "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (245, 245, 245)}
SHAPES = ("square", "circle", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CATEGORIES = ("temporal", "counting", "spatial", "needle")
OPTION_ORDERS = ("shuffled", "ordered")
TRACES = ("frames", "brief")
NEEDLE_COLORS = ("red", "green", "blue", "yellow")   # the needle's options when ordered
SAME_TIME, NEITHER = "they appeared at the same time", "neither of them appeared"
LETTERS = "ABCD"
BACKGROUND = 110


@dataclasses.dataclass(frozen=True)
class Event:
    color: str
    shape: str
    quadrant: int
    start: int
    length: int


def _draw(frame: np.ndarray, ev: Event) -> None:
    h, w = frame.shape[:2]
    r0, c0 = (ev.quadrant // 2) * h // 2, (ev.quadrant % 2) * w // 2
    qh, qw = h // 2, w // 2
    yy, xx = np.mgrid[0:qh, 0:qw]
    cy, cx = (qh - 1) / 2, (qw - 1) / 2
    if ev.shape == "square":
        mask = (abs(yy - cy) <= qh * 0.4) & (abs(xx - cx) <= qw * 0.4)
    elif ev.shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (qh * 0.42) ** 2
    else:  # triangle, apex up
        mask = (yy >= qh * 0.1) & (yy <= qh * 0.9) & (abs(xx - cx) <= (yy - qh * 0.1) * 0.55)
    frame[r0:r0 + qh, c0:c0 + qw][mask] = COLORS[ev.color]


def render(events: list[Event], num_frames: int, size: int) -> np.ndarray:
    frames = np.full((num_frames, size, size, 3), BACKGROUND, np.uint8)
    for ev in events:
        for t in range(ev.start, ev.start + ev.length):
            _draw(frames[t], ev)
    return frames


def _name(ev: Event) -> str:
    return f"the {ev.color} {ev.shape}"


class _Builder:
    """Draws the events and the question for one example."""

    def __init__(self, rng: np.random.Generator, num_frames: int, sample_frames: int,
                 distractors: bool = True, brief: bool = False):
        self.rng = rng
        self.distractors = distractors
        self.brief = brief
        self.f = num_frames
        self.lo, self.hi = int(np.ceil(0.1 * num_frames)), int(np.floor(0.9 * num_frames))
        # Long enough that uniform sampling of `sample_frames` frames always lands on it.
        self.span = int(np.ceil((num_frames - 1) / max(sample_frames - 1, 1))) + 1

    def _slots(self, n: int, lo: int, hi: int, length: int) -> list[int]:
        """n non-overlapping start frames in [lo, hi - length], separated by >= 1 empty frame."""
        free = hi - lo - n * length - (n - 1)
        if free < 0:
            raise ValueError(f"{self.f} frames are too few for {n} events; use more frames")
        gaps = np.sort(self.rng.integers(0, free + 1, n))
        starts, pos = [], lo
        prev = 0
        for g in gaps:
            pos += g - prev
            prev = g
            starts.append(int(pos))
            pos += length + 1
        return starts

    def _distinct(self, n: int) -> list[tuple[str, str]]:
        colors = self.rng.permutation(list(COLORS))[:n]
        return [(str(c), str(self.rng.choice(SHAPES))) for c in colors]

    def temporal(self):
        (ca, sa), (cb, sb) = self._distinct(2)
        mid = (self.lo + self.hi) // 2
        a = Event(ca, sa, int(self.rng.integers(4)), self._slots(1, self.lo, mid, self.span)[0],
                  self.span)
        b = Event(cb, sb, int(self.rng.integers(4)),
                  self._slots(1, mid + 1, self.hi, self.span)[0], self.span)
        names = sorted([_name(a), _name(b)], key=lambda _: self.rng.random())
        q = f"Which appeared first in the video: {names[0]} or {names[1]}?"
        wrong = [_name(b), SAME_TIME, NEITHER]
        trace = (f"{_name(a).capitalize()} appears at frame {a.start} in the {QUADRANTS[a.quadrant]}."
                 f" {_name(b).capitalize()} appears at frame {b.start} in the "
                 f"{QUADRANTS[b.quadrant]}. Frame {a.start} comes before frame {b.start}, so "
                 f"{_name(a)} appeared first.")
        return [a, b], q, _name(a), wrong, trace

    def counting(self):
        (ct, st), *others = self._distinct(3)
        n = int(self.rng.integers(1, 5))
        distract = int(self.rng.integers(1, 3))
        starts = self._slots(n + distract, self.lo, self.hi, self.span)
        order = self.rng.permutation(n + distract)
        events, target = [], []
        for k, i in enumerate(order):
            if k < n:
                ev = Event(ct, st, int(self.rng.integers(4)), starts[i], self.span)
                target.append(ev)
            else:
                c, s = others[k % len(others)]
                ev = Event(c, s, int(self.rng.integers(4)), starts[i], self.span)
            events.append(ev)
        target.sort(key=lambda e: e.start)
        q = f"How many times did the {ct} {st} appear in the video?"
        wrong = [str(x) for x in (1, 2, 3, 4) if x != n]
        cites = ", ".join(f"frame {e.start}" for e in target)
        trace = (f"The {ct} {st} appears at {cites}. Counting these appearances gives {n}.")
        return events, q, str(n), wrong, trace

    def spatial(self):
        pairs = self._distinct(3)
        quads = self.rng.permutation(4)[:3]
        starts = self._slots(3, self.lo, self.hi, self.span)
        events = [Event(c, s, int(qd), st, self.span) for (c, s), qd, st in
                  zip(pairs, quads, starts)]
        target = events[int(self.rng.integers(3))]
        q = f"Where in the frame did the {target.color} {target.shape} appear?"
        wrong = [QUADRANTS[i] for i in range(4) if i != target.quadrant]
        trace = (f"The {target.color} {target.shape} appears at frame {target.start} in the "
                 f"{QUADRANTS[target.quadrant]} of the frame.")
        return events, q, QUADRANTS[target.quadrant], wrong, trace

    def needle(self):
        (c, s), *_ = self._distinct(1)
        third = (self.hi - self.lo) // 3
        start = self._slots(1, self.lo + third, self.hi - third, self.span)[0]
        ev = Event(c, s, int(self.rng.integers(4)), start, self.span)
        q = f"A {s} appeared briefly somewhere in the video. What colour was it?"
        wrong = [str(x) for x in self.rng.permutation([k for k in COLORS if k != c])[:3]]
        trace = (f"At frame {start} a {c} {s} appears in the "
                 f"{QUADRANTS[ev.quadrant]}. No other object appears, so it was {c}.")
        return [ev], q, c, wrong, trace

    # ---- ordered options: the video is drawn so the answer is option `want` -----------------

    def temporal_ordered(self, want: int):
        (ca, sa), (cb, sb), (cc, sc), (cd, sd) = self._distinct(4)
        name_a, name_b = f"the {ca} {sa}", f"the {cb} {sb}"
        mid = (self.lo + self.hi) // 2
        early = self._slots(1, self.lo, mid, self.span)[0]
        late = self._slots(1, mid + 1, self.hi, self.span)[0]
        qa, qb = (int(x) for x in self.rng.permutation(4)[:2])
        if want == 0:
            events = [Event(ca, sa, qa, early, self.span), Event(cb, sb, qb, late, self.span)]
        elif want == 1:
            events = [Event(cb, sb, qb, early, self.span), Event(ca, sa, qa, late, self.span)]
        elif want == 2:
            t = self._slots(1, self.lo, self.hi, self.span)[0]
            events = [Event(ca, sa, qa, t, self.span), Event(cb, sb, qb, t, self.span)]
        else:
            events = [Event(cc, sc, qa, early, self.span), Event(cd, sd, qb, late, self.span)]
        q = f"Which appeared first in the video: {name_a} or {name_b}?"
        options = [name_a, name_b, SAME_TIME, NEITHER]
        if self.brief:
            both = " and ".join(_name(e) for e in events)
            before = f"{_name(events[0]).capitalize()} appears before {_name(events[1])}."
            trace = [before, before, f"{both.capitalize()} appear together.",
                     f"Only {both} appear."][want]
            return events, q, options, trace
        seen = " ".join(f"{_name(e).capitalize()} appears at frame {e.start} in the "
                        f"{QUADRANTS[e.quadrant]}." for e in events)
        first = (f"Frame {events[0].start} comes before frame {events[1].start}, so "
                 f"{_name(events[0])} appeared first.")
        verdict = [first, first,
                   "Both appear at the same frame, so they appeared at the same time.",
                   f"Neither {name_a} nor {name_b} appears."][want]
        return events, q, options, f"{seen} {verdict}"

    def counting_ordered(self, want: int):
        (ct, st), *others = self._distinct(3)
        n = want + 1
        distract = int(self.rng.integers(1, 3)) if self.distractors else 0
        starts = self._slots(n + distract, self.lo, self.hi, self.span)
        order = self.rng.permutation(n + distract)
        events, target = [], []
        for k, i in enumerate(order):
            c, s = (ct, st) if k < n else others[k % len(others)]
            events.append(Event(c, s, int(self.rng.integers(4)), starts[i], self.span))
            if k < n:
                target.append(events[-1])
        target.sort(key=lambda e: e.start)
        q = f"How many times did the {ct} {st} appear in the video?"
        cites = ", ".join(f"frame {e.start}" for e in target)
        trace = f"The {ct} {st} appears at {cites}. Counting these appearances gives {n}."
        if self.brief:
            trace = f"The {ct} {st} appears {n} times."
        return events, q, ["1", "2", "3", "4"], trace

    def spatial_ordered(self, want: int):
        n = 3 if self.distractors else 1
        pairs = self._distinct(n)
        others = [int(x) for x in
                  self.rng.permutation([i for i in range(4) if i != want])[:n - 1]]
        k = int(self.rng.integers(n))
        quads = others[:k] + [want] + others[k:]
        starts = self._slots(n, self.lo, self.hi, self.span)
        events = [Event(c, s, qd, st, self.span) for (c, s), qd, st in zip(pairs, quads, starts)]
        target = events[k]
        q = f"Where in the frame did the {target.color} {target.shape} appear?"
        trace = (f"The {target.color} {target.shape} appears at frame {target.start} in the "
                 f"{QUADRANTS[target.quadrant]} of the frame.")
        if self.brief:
            trace = f"The {target.color} {target.shape} is in the {QUADRANTS[target.quadrant]}."
        return events, q, list(QUADRANTS), trace

    def needle_ordered(self, want: int):
        c, s = NEEDLE_COLORS[want], str(self.rng.choice(SHAPES))
        third = (self.hi - self.lo) // 3
        start = self._slots(1, self.lo + third, self.hi - third, self.span)[0]
        ev = Event(c, s, int(self.rng.integers(4)), start, self.span)
        q = f"A {s} appeared briefly somewhere in the video. What colour was it?"
        trace = (f"At frame {start} a {c} {s} appears in the "
                 f"{QUADRANTS[ev.quadrant]}. No other object appears, so it was {c}.")
        if self.brief:
            trace = f"A {c} {s} appears."
        return [ev], q, list(NEEDLE_COLORS), trace


def make_example(index: int, *, seed: int, num_frames: int, size: int, split: str,
                 open_ended: bool = False, sample_frames: int | None = None,
                 options: str = "shuffled", distractors: bool = True,
                 traces: str = "frames") -> tuple[dict, np.ndarray]:
    if options not in OPTION_ORDERS:
        raise ValueError(f"options must be one of {OPTION_ORDERS}, got {options!r}")
    if not distractors and options != "ordered":
        raise ValueError("distractors=False needs options='ordered'")
    if traces not in TRACES or (traces == "brief" and options != "ordered"):
        raise ValueError(f"traces must be one of {TRACES} ('brief' needs options='ordered'), "
                         f"got {traces!r}")
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    category = CATEGORIES[index % len(CATEGORIES)]
    builder = _Builder(rng, num_frames, sample_frames or num_frames, distractors,
                       traces == "brief")
    correct = (index // len(CATEGORIES)) % 4  # cycles A-D within each category
    if options == "ordered":
        events, question, listed_options, trace = getattr(builder, f"{category}_ordered")(correct)
        answer = listed_options[correct]
    else:
        events, question, answer, wrong, trace = getattr(builder, category)()
    video = f"{split}_{index:06d}.mp4"
    row = {"problem_id": f"{split}-{index}", "category": category, "data_type": "video",
           "videos": [video], "reasoning": trace,
           "meta": {"events": [dataclasses.asdict(e) for e in events],
                    "num_frames": num_frames}}
    if open_ended:
        row.update(problem=question, answer=answer, problem_type="open_ended")
    else:
        if options == "ordered":
            choices = listed_options
        else:
            choices = list(rng.permutation(wrong)[:3])
            choices.insert(correct, answer)
        listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(choices))
        row.update(problem=f"{question}\nOptions:\n{listed}", answer=LETTERS[correct],
                   options=choices, problem_type="multiple_choice")
    return row, render(events, num_frames, size)


def vocabulary(rows) -> list[str]:
    """Every word of the rows' text and the prompts (for the tiny tokenizer)."""
    from longrl_jax.data import longvideo_reason as lvr
    prompts = " ".join([lvr.SYSTEM_THINKING, lvr.SYSTEM_NON_THINKING, lvr.MCQ_SUFFIX])
    words = set(re.findall(r"[A-Za-z]+", prompts)) | set(LETTERS)
    for row in rows:
        text = " ".join([row["problem"], row["reasoning"], row["answer"],
                         *row.get("options", [])])
        words |= set(re.findall(r"[A-Za-z]+", text))
    return sorted(words)


def generate(out_dir: str, *, num_train: int, num_eval: int, num_frames: int, seed: int = 0,
             size: int = 64, fps: float = 8.0, open_ended_fraction: float = 0.0,
             tokenizer: bool = False, sample_frames: int | None = None,
             options: str = "shuffled", distractors: bool = True,
             traces: str = "frames") -> dict:
    """Writes `out_dir/{train,eval}.jsonl` and `out_dir/videos/*.mp4`; returns counts."""
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    counts, all_rows = {}, []
    for split, n in (("train", num_train), ("eval", num_eval)):
        rows = []
        for i in range(n):
            open_ended = (i % 10) < round(open_ended_fraction * 10)
            row, frames = make_example(i, seed=seed, num_frames=num_frames, size=size,
                                       split=split, open_ended=open_ended,
                                       sample_frames=sample_frames, options=options,
                                       distractors=distractors, traces=traces)
            write_video(os.path.join(out_dir, "videos", row["videos"][0]), frames, fps=fps)
            rows.append(row)
        all_rows += rows
        tmp = os.path.join(out_dir, f".{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, os.path.join(out_dir, f"{split}.jsonl"))
        counts[split] = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    if tokenizer:
        from longrl_jax.data.tokenizer import build_qwen2_tokenizer
        build_qwen2_tokenizer(vocabulary(all_rows), os.path.join(out_dir, "tokenizer"))
    return counts


def iter_rows(path: str) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)
