"""The VLM of either family, with the video spliced at its placeholder: LongVILA (SigLIP tower ->
2x2 projector -> Qwen2) or Qwen2.5-VL (its tower with the merger -> Qwen2 with M-RoPE). An
LLM-only checkpoint gives the same object without tower and projector, so callers always reach
the language model as `model.llm`. The family shows only inside this package.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longrl_jax.models import qwen2_5_vl
from longrl_jax.models.config import ModelConfig
from longrl_jax.models.projector import Projector
from longrl_jax.models.qwen2 import Qwen2ForCausalLM
from longrl_jax.models.qwen2_5_vl_vision import Qwen25VisionModel
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
        if cfg.is_vlm and cfg.family == "qwen2_5_vl":
            self.vision_tower = Qwen25VisionModel(cfg.vision, **kw)
            self.mm_projector = None   # the tower's merger projects
        elif cfg.is_vlm:
            self.vision_tower = SiglipVisionModel(cfg.vision, **kw)
            self.mm_projector = Projector(cfg.projector, **kw)
        else:
            self.vision_tower = None
            self.mm_projector = None

    def encode_video(self, frames_fhwc: jax.Array) -> jax.Array:
        """Normalised frames [F, H, W, C] -> projector output [F, tokens_per_frame, D]; for
        Qwen2.5-VL the merger's rows per temporal patch of 2 frames, [ceil(F/2), H*W/28^2, D].

        The "\\n" separator is not included: it comes from the LLM's current embedding table at
        splice time, so cached embeddings stay valid while the LLM trains.
        """
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (an LLM-only checkpoint)")
        if self.cfg.family == "qwen2_5_vl":
            return qwen2_5_vl.encode_frames(self.vision_tower, frames_fhwc)
        return self.mm_projector(self.vision_tower.features(frames_fhwc))

    def hf_logits(self, input_ids, *, pixel_values_videos=None, video_grid_thw=None,
                  attention_mask=None, second_per_grid_ts=None) -> jax.Array:
        """The logits transformers' own model of this family returns for the same processor
        outputs (`input_ids` with each video expanded to its placeholder tokens), float32.
        Qwen2.5-VL: see `qwen2_5_vl.hf_logits` (positions by the original M-RoPE scheme)."""
        if self.cfg.family == "qwen2_5_vl":
            return qwen2_5_vl.hf_logits(self, input_ids, pixel_values_videos=pixel_values_videos,
                                        video_grid_thw=video_grid_thw,
                                        attention_mask=attention_mask,
                                        second_per_grid_ts=second_per_grid_ts)
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise NotImplementedError("hf_logits with frames is implemented for Qwen2.5-VL only;"
                                      " LongVILA has no transformers model to match")
        # transformers' Qwen2 numbers positions 0..T-1 whatever the mask; so does this.
        mask = None if attention_mask is None else jnp.asarray(np.asarray(attention_mask))
        return self.llm(jnp.asarray(np.asarray(input_ids)), attention_mask_bt=mask)

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
