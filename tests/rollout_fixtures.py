"""A tiny transformers Qwen2 checkpoint with its own tokenizer, served by a real rollout server
(vLLM engine, gRPC) for the whole test session: engine start costs ~40 s on 2 cores."""

from __future__ import annotations

import os

import numpy as np
import torch
from hf_fixtures import perturb

from longrl_jax.data.tokenizer import build_qwen2_tokenizer

TOKEN = "test-token-3b1f"
WORDS = [f"w{i}" for i in range(60)]


def write_served_qwen2(path: str, *, vocab: int = 384, seed: int = 0) -> str:
    """A float32 Qwen2 (head_dim 32: vLLM's CPU attention needs >= 32) whose weights are far
    enough from init that greedy decoding has clear margins, plus a tokenizer that fits in it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_qwen2_tokenizer(WORDS, path)
    assert len(tok) <= vocab, (len(tok), vocab)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=1024,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(seed)
    model = perturb(Qwen2ForCausalLM(cfg), seed, scale=0.3)
    model.save_pretrained(path)
    return path


def server_env() -> dict:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "TOKENIZERS_PARALLELISM": "false"}
    return {k: v for k, v in env.items() if k not in os.environ}


def rows(array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


MAX_LEN = 1024


def start_shared_server(tmp_path_factory):
    """The session's server (conftest's `rollout_server`): the tiny Qwen2 above behind a token,
    blocks of 32 tokens; yields (RolloutServerProcess, checkpoint dir)."""
    from longrl_jax.rl.connection import RolloutServerProcess

    path = write_served_qwen2(str(tmp_path_factory.mktemp("served") / "qwen2"))
    log = str(tmp_path_factory.getbasetemp() / "rollout_server.log")
    server = RolloutServerProcess(path, token=TOKEN, env=server_env(), log_path=log,
                                  args=["--max-model-len", str(MAX_LEN), "--block-size", "32"])
    with server:
        yield server, path
