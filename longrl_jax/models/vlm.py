"""The LongVILA-style VLM: SigLIP tower -> 2x2 projector -> Qwen2, with the video spliced at its
placeholder. An LLM-only checkpoint gives the same object without tower and projector, so callers
always reach the language model as `model.llm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longrl_jax.models.config import ModelConfig
from longrl_jax.models.projector import Projector
from longrl_jax.models.qwen2 import Qwen2ForCausalLM
from longrl_jax.models.siglip import SiglipVisionModel
from longrl_jax.models.splice import splice_embeddings


class VLM(nnx.Module):
    """The one model object every stage and tool holds: `llm` always, `vision_tower` and
    `mm_projector` when the checkpoint has them. Trainers reach the language model as
    `model.llm`, encode frames with `encode_video` and build inputs with `splice`, so no
    caller branches on what the checkpoint contains."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, scan_layers: bool = False):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.llm = Qwen2ForCausalLM(cfg.llm, remat=remat, scan_layers=scan_layers, **kw)
        if cfg.is_vlm:
            self.vision_tower = SiglipVisionModel(cfg.vision, **kw)
            self.mm_projector = Projector(cfg.projector, **kw)
        else:
            self.vision_tower = None
            self.mm_projector = None

    def encode_video(self, frames_fhwc: jax.Array) -> jax.Array:
        """Normalised frames [F, H, W, C] -> projector output [F, tokens_per_frame, D].

        The "\\n" separator is not included: it comes from the LLM's current embedding table at
        splice time, so cached embeddings stay valid while the LLM trains.
        """
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (an LLM-only checkpoint)")
        return self.mm_projector(self.vision_tower.features(frames_fhwc))

    def video_table(self, table):
        """The video rows the trainers' splice uses (`parallel.logprobs.embed_inputs`): the
        cached rows they are given. A baseline that re-encodes frames inside every pass
        (bench/rl_step.py) overrides this."""
        return table

    def splice(self, token_ids_bt: jax.Array, video_rows_bt: jax.Array,
               video_embeds_nd: jax.Array) -> jax.Array:
        """Input embeddings [B, T, D] for a layout from `splice.splice_layout`."""
        text = self.llm.embed(token_ids_bt)
        return splice_embeddings(text, video_embeds_nd.astype(text.dtype), video_rows_bt, xp=jnp)

    def __call__(self, token_ids_bt: jax.Array, video_rows_bt: jax.Array,
                 video_embeds_nd: jax.Array, **kw) -> jax.Array:
        return self.llm(inputs_embeds_btd=self.splice(token_ids_bt, video_rows_bt,
                                                      video_embeds_nd), **kw)
