"""The embedded default job: tiny VLM on the synthetic long-video suite, CPU-sized.

  make demo
  # = python -m longrl_jax.main --config=configs/demo.py --workdir=runs/demo

Until the training stages land, the job builds the model on the mesh, encodes a video, splices
it into a prompt and runs the sharded forward, then says which stages are not built yet.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(preset="tiny", vocab_size=512, checkpoint="",
                                             param_dtype="float32", dtype="float32"))
    c.model.video_token_id = 3
    c.model.separator_token_id = 4
    c.model.scan_layers = False
    c.model.remat = False
    c.mesh = common.mesh_config()
    c.sharding_rules = common.sharding_rules()
    c.sp = common.sp_config()
    c.num_frames = 16
    c.data = common.data_config(num_frames=16)
    c.stages = ("sft", "rl", "eval", "export")
    return c
