"""Entry point: `python -m longrl_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

Configs are ml_collections files with `get_config(arg)`, locked, overridable from the command
line (`--config.num_frames=32`). The stages named in `config.stages` run in order.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from longrl_jax import build

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where the run writes everything", required=True)

BUILT_STAGES: tuple[str, ...] = ()  # the training issue fills this in


def smoke_forward(model, config, mesh) -> dict:
    """Encode a random video with MR-SP stage 1, splice it into a prompt, and run the stage-2
    forward (sequence-parallel when the mesh has a 'sequence' axis): proves the wiring."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from longrl_jax.models.splice import splice_layout
    from longrl_jax.parallel import sequence, video

    cfg = model.cfg
    size = cfg.vision.image_size
    frames = jax.random.uniform(jax.random.key(config.seed), (config.num_frames, size, size, 3),
                                minval=-1, maxval=1)
    lay = splice_layout([1, 2, cfg.video_token_id, 5, 6], video_token_id=cfg.video_token_id,
                        frames_per_video=[config.num_frames],
                        tokens_per_frame=cfg.tokens_per_frame,
                        separator_id=cfg.separator_token_id)

    embeds = video.encode_video_sharded(model, frames, mesh=mesh,
                                        frames_per_chunk=config.sp.frames_per_chunk,
                                        rules=build.rules(config))
    spliced = nnx.jit(lambda m, ids, rows, e: m.splice(ids, rows, e))(
        model, jnp.asarray(lay.token_ids)[None], jnp.asarray(lay.video_rows)[None],
        embeds.reshape(-1, embeds.shape[-1]))
    layout = config.sp.layout if mesh.shape["sequence"] > 1 else "contiguous"
    seq = sequence.pad_and_shard(spliced, mesh=mesh, layout=layout)
    logits = nnx.jit(lambda m, e, p, v: m.llm(inputs_embeds_btd=e, positions_bt=p,
                                              attention_mask_bt=v))(
        model, seq.arrays[0], seq.positions, seq.valid)
    logits = sequence.chunked_device_get(seq.unshard(logits), config.sp.gather_chunk_rows, 1)
    return {"frames": config.num_frames, "sequence_length": lay.length,
            "logits_shape": list(logits.shape), "finite": bool(np.isfinite(logits).all()),
            "sequence_parallel": mesh.shape["sequence"]}


def main(argv):
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    try:
        model, mesh = build.build_model(config)
    except ValueError as e:
        sys.exit(f"longrl_jax.main: {e}")
    logging.info("mesh %s", dict(mesh.shape))
    report = smoke_forward(model, config, mesh) if model.cfg.is_vlm else {}
    with open(os.path.join(workdir, "smoke.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"model built on mesh {dict(mesh.shape)}; spliced forward: {report}")
    missing = [s for s in config.stages if s not in BUILT_STAGES]
    if missing:
        print(f"stages not built yet: {', '.join(missing)} (see the training issue)")


if __name__ == "__main__":
    app.run(main)
