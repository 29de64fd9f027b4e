"""longrl_jax: long-video RL for vision-language models in JAX/Flax NNX."""
