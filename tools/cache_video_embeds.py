"""Precomputes the video embeddings of a dataset (MR-SP stage 1, frames sharded over devices).

  python tools/cache_video_embeds.py --config=configs/demo.py --data=train.jsonl \\
      --video_dir=videos --cache_dir=/tmp/cache --report=/tmp/report.json [--config.x=...]

Every unique video of the good rows is sampled as the config says, encoded by the config's
vision tower and projector, and stored in the cache (`longrl_jax.data.embed_cache`). Bad rows
and unreadable videos are reported, never fatal. The report JSON:
  {"computed": n, "cached": n, "skipped": [{"row": i, "reason": "..."}], "read": n, "kept": n}
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from longrl_jax import build
from longrl_jax.data import longvideo_reason
from longrl_jax.data.frames import VideoError
from longrl_jax.embedder import VideoEmbedder

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config", lock_config=True)
DATA = flags.DEFINE_string("data", None, "LongVideo-Reason JSONL", required=True)
VIDEO_DIR = flags.DEFINE_string("video_dir", None, "directory the rows' videos are in",
                                required=True)
CACHE_DIR = flags.DEFINE_string("cache_dir", None, "embedding cache directory", required=True)
REPORT = flags.DEFINE_string("report", None, "where to write the JSON report", required=True)


def main(argv):
    del argv
    config = _CONFIG.value
    try:
        model, mesh = build.build_model(config)
        embedder = VideoEmbedder.from_config(model, mesh, config, CACHE_DIR.value,
                                             build.rules(config), keep_in_memory=False)
    except ValueError as e:
        sys.exit(f"cache_video_embeds: {e}")
    report = longvideo_reason.Report()
    done: set[str] = set()
    for row, ex in longvideo_reason.read_jsonl(DATA.value, VIDEO_DIR.value, report):
        for path in ex.videos:
            if path in done:
                continue
            try:
                embedder(path)
            except VideoError as e:  # decodes but breaks mid-way (truncated stream, say)
                report.skip(row, str(e))
                continue
            done.add(path)
    out = {"computed": embedder.computed, "cached": embedder.cached, "skipped": report.skipped,
           "read": report.read, "kept": report.kept}
    with open(REPORT.value, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "skipped"} |
                     {"skipped": len(report.skipped)}))


if __name__ == "__main__":
    app.run(main)
