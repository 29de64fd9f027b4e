"""vLLM's own Qwen2.5-VL model serves our export from cached video embeddings and their grid (as
the rollout server will: one `<|video_pad|>` per video, `enable_mm_embeds`, both mm limits 0 so
the tower is not loaded): its greedy tokens are ours, and its log-probs equal ours at 1e-4 with
the positions of `models/positions.py`, for a video whose temporal positions pass its width
(where transformers 5's `get_rope_index` would differ)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longrl_jax.data.tokenizer import build_qwen2_tokenizer
from longrl_jax.models import VLM, ModelConfig, hf, positions

SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
GRID, SECONDS, STEPS = [3, 4, 6], 2.0, 8

SERVE = r"""
import json, sys
import numpy as np, torch
from vllm import LLM, SamplingParams
d = sys.argv[1]
spec = json.load(open(d + "/request.json"))
llm = LLM(model=d + "/export", enable_mm_embeds=True, dtype="float32", max_model_len=256,
          limit_mm_per_prompt={"image": 0, "video": 0}, enforce_eager=True, seed=0)
video = {"video_embeds": torch.tensor(np.load(d + "/embeds.npy")),
         "video_grid_thw": torch.tensor([spec["grid"]]),
         "second_per_grid_ts": torch.tensor([spec["seconds"]])}
out = llm.generate([{"prompt_token_ids": spec["ids"], "multi_modal_data": {"video": video}}],
                   SamplingParams(temperature=0.0, max_tokens=spec["steps"], logprobs=0,
                                  detokenize=False))[0].outputs[0]
json.dump({"tokens": list(out.token_ids),
           "logprobs": [d[t].logprob for d, t in zip(out.logprobs, out.token_ids)]},
          open(d + "/served.json", "w"))
"""


def _model(tmp_path):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    tok = build_qwen2_tokenizer(["red", "blue", "green", "left", "right"], extra_special=SPECIAL)
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id",
                    "video_token_id"), tok.convert_tokens_to_ids(SPECIAL)))
    base = ModelConfig.qwen2_5_vl_tiny()
    cfg = base.replace(llm=base.llm.__class__(**{**base.llm.__dict__, "vocab_size": len(tok)}),
                       **ids)
    model = VLM(cfg, rngs=nnx.Rngs(0))
    key = jax.random.key(1)
    for _p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):   # varied greedy tokens
        key, sub = jax.random.split(key)
        var[...] = var[...] + 0.3 * jax.random.normal(sub, var.shape)
    src = tmp_path / "tokenizer"
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor()).save_pretrained(src)
    hf.save_pretrained(model, str(tmp_path / "export"), tokenizer_dir=str(src))
    return model


def test_vllm_serves_export_from_embeddings(tmp_path):
    model = _model(tmp_path)
    cfg = model.cfg
    frames = np.random.RandomState(0).randn(2 * GRID[0], 56, 84, 3).astype(np.float32)
    rows_nd = np.asarray(model.encode_video(frames)).reshape(-1, cfg.llm.hidden_size)
    np.save(tmp_path / "embeds.npy", rows_nd)
    pre, post = [5, 6, 7], [8, 9, 10, 11]
    prompt = pre + [cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id] + post
    json.dump({"ids": prompt, "grid": GRID, "seconds": SECONDS, "steps": STEPS},
              open(tmp_path / "request.json", "w"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    served = json.load(open(tmp_path / "served.json"))

    # Ours: the same prompt with the video expanded to its rows, then the served tokens.
    full = pre + [cfg.vision_start_token_id] + [cfg.video_token_id] * len(rows_nd) + [
        cfg.vision_end_token_id] + post
    seq = np.asarray(full + served["tokens"])
    rows = positions.video_rows_from_ids(full, cfg.video_token_id)
    pos = positions.prompt_positions(rows, video_grid_thw=[GRID], second_per_grid_ts=[SECONDS],
                                     tokens_per_second=cfg.vision.tokens_per_second,
                                     response_length=STEPS)
    video_rows = np.concatenate([rows, np.full(STEPS, -1)])
    logits = model(jnp.asarray(np.where(video_rows >= 0, 0, seq))[None],
                   jnp.asarray(video_rows)[None], jnp.asarray(rows_nd),
                   positions_bt=jnp.asarray(pos[:, None]))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    n = len(full)
    greedy = logp[n - 1:n - 1 + STEPS].argmax(-1)
    ours = logp[np.arange(n - 1, n - 1 + STEPS), served["tokens"]]
    assert len(set(served["tokens"])) > 1, "a constant output would not test the positions"
    np.testing.assert_array_equal(greedy, served["tokens"])
    np.testing.assert_allclose(ours, served["logprobs"], atol=1e-4, rtol=0)
