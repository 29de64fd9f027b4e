"""Flax NNX models: Qwen2, SigLIP, the 2x2 projector and the VLM; `hf` imports and exports."""

from longrl_jax.models.config import (
                                      ConfigError,
                                      LLMConfig,
                                      ModelConfig,
                                      ProjectorConfig,
                                      VisionConfig,
)
from longrl_jax.models.vlm import VLM

__all__ = ["ConfigError", "LLMConfig", "ModelConfig", "ProjectorConfig", "VisionConfig", "VLM"]
