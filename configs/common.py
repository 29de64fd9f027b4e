"""Every config field and its default, in one place: experiment configs call these builders
and change only what differs; nothing downstream restates a default."""

import ml_collections

from longrl_jax.parallel.mesh import DEFAULT_RULES


def model_config(preset: str = "tiny", **kw):
    """The model: a `ModelConfig` preset built from scratch, or `checkpoint` (an HF directory).
    `init_std` rescales a fresh model's random weights (never a checkpoint's); `attention`
    "flash" is blockwise, for long sequences without SP; token ids -1 come from the tokenizer.
    `remat_offload` (with `remat`) keeps each layer's saved input in pinned host memory, not on
    the device: longer sequences for host<->device traffic. `mlp_chunk` > 0 runs the MLP on
    pieces of about that many tokens per device (its [T, 5D] intermediates one piece at a time)."""
    c = ml_collections.ConfigDict(dict(
        preset=preset, vocab_size=640, checkpoint="", param_dtype="float32", dtype="float32",
        init_std=0.02, attention="dense", video_token_id=-1, separator_token_id=-1,
        scan_layers=False, remat=False, remat_offload=False, mlp_chunk=0))
    c.update(kw)
    return c


def mesh_config(data: int = 1, fsdp: int = -1, sequence: int = 1, tensor: int = 1):
    """Mesh axis sizes; -1 = the rest of the devices."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor))


def sharding_rules():
    """Logical axis -> mesh axes, as a tuple of pairs (MaxText-style); edit per experiment."""
    return tuple((name, axes) for name, axes in DEFAULT_RULES)


def sp_config(strategy: str = "ring", layout: str = "zigzag", frames_per_chunk: int = 8):
    """MR-SP: the stage-2 attention strategy and sequence layout (used when mesh.sequence > 1)
    and stage 1's frames per encoding chunk."""
    return ml_collections.ConfigDict(dict(strategy=strategy, layout=layout,
                                          frames_per_chunk=frames_per_chunk))


def data_config(num_frames: int | None = 16, fps: float | None = None,
                max_frames: int | None = None, decode_batch: int = 32):
    """Frame sampling: `num_frames` uniformly over the video, or `fps` with a `max_frames` cap
    (set num_frames to None); frames are decoded `decode_batch` at a time."""
    return ml_collections.ConfigDict(dict(num_frames=num_frames, fps=fps, max_frames=max_frames,
                                          decode_batch=decode_batch))


def optimizer_config(lr: float, warmup_steps: int = 0, weight_decay: float = 0.01,
                     grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.999):
    """AdamW (Long-RL: lr 1e-6, betas 0.9/0.999, weight decay 0.01, clip 1.0, constant)."""
    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps,
                                          weight_decay=weight_decay, grad_clip=grad_clip,
                                          b1=b1, b2=b2))


def synthetic_dataset(num_train: int, num_eval: int, video_frames: int, size: int = 32,
                      seed: int = 0, options: str = "shuffled", distractors: bool = True,
                      traces: str = "frames"):
    """The embedded synthetic long-video suite, generated into WORKDIR/data on first use;
    `options` ("shuffled" or "ordered"), `distractors` and `traces` ("frames" or "brief"): see
    longrl_jax/data/synthetic.py."""
    return ml_collections.ConfigDict(dict(
        kind="synthetic", train="", eval="", video_dir="", tokenizer="",
        synthetic=dict(num_train=num_train, num_eval=num_eval, video_frames=video_frames,
                       size=size, seed=seed, options=options, distractors=distractors,
                       traces=traces)))


def jsonl_dataset(train: str, eval: str, video_dir: str, tokenizer: str):
    """LongVideo-Reason JSONL splits, their video directory and the model's tokenizer."""
    return ml_collections.ConfigDict(dict(
        kind="jsonl", train=train, eval=eval, video_dir=video_dir, tokenizer=tokenizer,
        synthetic=dict(num_train=0, num_eval=0, video_frames=0, size=0, seed=0,
                       options="shuffled", distractors=True, traces="frames")))


def sft_config(steps: int, batch_size: int, lr: float, *, num_examples: int = 0,
               max_response_tokens: int = 2048, trainable: str = "llm", warmup_steps: int = 0,
               checkpoint_every: int = 100, keep_checkpoints: int = 2, num_frames: int = 0,
               micro_batch_size: int = 0):
    """CoT-SFT. `num_examples` > 0 trains on the first N training rows only; `trainable` is
    "llm", "llm+projector" or "all" (the vision tower too); `num_frames` > 0 samples that many
    frames per video for SFT instead of `data.num_frames` (short clips first, long videos in RL
    and evaluation). `micro_batch_size` > 0: sequences per device per forward/backward, the
    gradient accumulated over the batch (0: the whole batch at once)."""
    return ml_collections.ConfigDict(dict(
        steps=steps, batch_size=batch_size, num_examples=num_examples, num_frames=num_frames,
        micro_batch_size=micro_batch_size,
        max_response_tokens=max_response_tokens, trainable=trainable,
        optimizer=optimizer_config(lr, warmup_steps), checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints))


def rl_config(steps: int, prompts_per_step: int, group_size: int, lr: float, **kw):
    """GRPO and relatives; defaults are Long-RL's examples/config.yaml
    (docs/REFERENCE.md, "GRPO defaults")."""
    c = ml_collections.ConfigDict(dict(
        algorithm="grpo",            # grpo | dr_grpo | rloo | reinforce_pp
        steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
        max_response_tokens=2048, temperature=1.0, top_p=0.99,
        clip_low=0.2, clip_high=0.3, clip_dual=3.0, loss_agg="token-mean",
        kl_coef=0.01, kl_type="low_var_kl", kl_in="loss",   # kl_in: loss | reward
        gamma=1.0,
        minibatch_size=prompts_per_step * group_size, ppo_epochs=1,
        # Sequences per device per forward/backward (0: a whole mini-batch / all at once):
        # Long-RL's micro_batch_size_per_device_for_update / _for_experience.
        micro_batch_size=0, logprob_micro_batch_size=0,
        # Memory for long videos: the step's video rows and the reference parameters wait in
        # the devices' pinned host memory between passes instead of device memory.
        video_on_host=False, ref_on_host=False,
        dynamic_sampling=False, max_refills=20,
        overlong_buffer=0, overlong_penalty=1.0,
        optimizer=optimizer_config(lr),
        eval_every=0, checkpoint_every=1, keep_checkpoints=2))
    c.update(kw)
    return c


def rollout_config(max_model_len: int = 4096, dtype: str = "bfloat16", **kw):
    """The rollout server: started by the trainer unless `address` names a running one (with
    `token`, and `ca_file` for TLS). A call that fails (the server died, wedged or broke) is
    tried `max_attempts` times in all, the server restarted before each retry.
    With several processes: one server per host, started by the host's first process
    (`server_per` "host"), or one per process ("process"); `addresses` ("h1:p1,h2:p2") names
    running servers instead, one per host or per process in process order."""
    c = ml_collections.ConfigDict(dict(address="", addresses="", server_per="host",
                                       token="", ca_file="", port=0, dtype=dtype,
                                       max_model_len=max_model_len, block_size=0,
                                       kvcache_gib=4, cpu_threads_bind="", max_attempts=4))
    c.update(kw)
    return c


def eval_config(num_examples: int = 0, max_tokens: int = 2048, temperature: float = 0.0,
                n: int = 1, num_frames: int = 0):
    """Held-out evaluation; temperature 0 is greedy (Long-RL validates at 0.5, n = 1); `n`
    samples per question (accuracy is their mean); `num_frames` > 0 evaluates at that many
    frames per video instead of `data`'s sampling (longrl_jax/evaluate.py)."""
    return ml_collections.ConfigDict(dict(num_examples=num_examples, max_tokens=max_tokens,
                                          temperature=temperature, n=n, num_frames=num_frames))


def distributed_config(coordinator: str = "", num_processes: int = 1, process_id: int = 0):
    """Several cooperating processes (`jax.distributed`): `coordinator` HOST:PORT of process 0
    ("" = one process, unless Slurm, a TPU pod or JAX_COORDINATOR_ADDRESS say otherwise: jax
    detects those itself), the process count and this process's id; `local_device_ids`
    ("0,1") when several processes share a host's accelerators. A peer silent for
    `heartbeat_timeout_s` stops the others with an error naming it."""
    return ml_collections.ConfigDict(dict(coordinator=coordinator, num_processes=num_processes,
                                          process_id=process_id, local_device_ids="",
                                          init_timeout_s=300, heartbeat_timeout_s=20))


def judge_config():
    """The open-ended LLM judge (off unless `url` is set)."""
    return ml_collections.ConfigDict(dict(url="", model="gpt-4o-mini",
                                          api_key_env="OPENAI_API_KEY", timeout_s=30.0,
                                          max_retries=3, max_concurrency=8))
