"""A run's data on disk: the synthetic suite generated once, the JSONL splits written as the
array_record files grain reads (bad rows reported in `records/done`)."""

from __future__ import annotations

import json
import logging
import os

from longrl_jax.data import longvideo_reason as lvr
from longrl_jax.data import synthetic

log = logging.getLogger(__name__)

DATASET_KINDS = ("synthetic", "jsonl")


def fewest_frames(config) -> int | None:
    """The fewest frames any stage samples per video: synthetic events are made long enough
    for that sampling to see them."""
    counts = [config.data.num_frames]
    if "sft" in config.stages and config.sft.num_frames:
        counts.append(config.sft.num_frames)
    counts = [n for n in counts if n]
    return min(counts) if counts else None


def prepare_data(config, workdir: str) -> tuple[str, str, str]:
    """(records_dir, video_dir, tokenizer_dir). The synthetic suite is generated once; the
    JSONL splits are written as array_record files grain reads."""
    d = config.dataset
    if d.kind == "synthetic":
        root = os.path.join(workdir, "data")
        if not os.path.exists(os.path.join(root, "eval.jsonl")):
            s = d.synthetic
            counts = synthetic.generate(root, num_train=s.num_train, num_eval=s.num_eval,
                                        num_frames=s.video_frames, seed=s.seed, size=s.size,
                                        tokenizer=True, sample_frames=fewest_frames(config),
                                        options=s.options, distractors=s.distractors,
                                        traces=s.traces)
            log.info("synthetic suite: %s", counts)
        train, evals = os.path.join(root, "train.jsonl"), os.path.join(root, "eval.jsonl")
        video_dir, tok_dir = os.path.join(root, "videos"), os.path.join(root, "tokenizer")
    else:
        train, evals, video_dir, tok_dir = d.train, d.eval, d.video_dir, d.tokenizer
        root = os.path.join(workdir, "data")
    records = os.path.join(root, "records")
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(records, "done")):
        splits = {"train": train, "eval": evals}
        sft_n = config.sft.num_examples
        if sft_n:
            head = os.path.join(root, "sft.jsonl")
            with open(train) as src, open(head, "w") as dst:
                for i, line in enumerate(src):
                    if i >= sft_n:
                        break
                    dst.write(line)
            splits["sft"] = head
        report = lvr.build_array_records(records, splits, video_dir)
        with open(os.path.join(records, "done"), "w") as f:
            json.dump(report, f)
    return records, video_dir, tok_dir
