"""Ask a trained policy about a video: what `tools/ask.py` and `tools/web_demo.py` serve.

`VideoQA` loads a policy (a run's newest, or a checkpoint), starts the rollout server from it
(or connects to a running one) and answers one question at a time: the video's frames are
sampled and embedded by the policy's vision tower (cached on disk, and sent to the server once
per video), the question is written as a training prompt is (`Example.messages`, thinking on or
off), and the response is split into its `<think>` reasoning and its `<answer>`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

import numpy as np

from longrl_jax.data import longvideo_reason as lvr

_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


@dataclasses.dataclass
class Answer:
    reasoning: str            # the <think> span ("" without one)
    answer: str               # the <answer> span, else the text after </think>
    response: str             # the whole decoded response
    problem: str              # the question as the model saw it (options lettered)
    frames: np.ndarray        # [F, H, W, 3] uint8: the sampled frames the model saw


def split_response(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a response; either closing tag may be missing."""
    think = _THINK.search(text)
    ans = _ANSWER.search(text)
    reasoning = think.group(1).strip() if think else ""
    if ans:
        answer = ans.group(1).strip()
    elif "</think>" in text:
        answer = text.rsplit("</think>", 1)[-1].strip()
    else:                          # reasoning cut short, or no tags: all of it is the answer
        answer = "" if think else text.strip()
    return reasoning, answer


def question_example(video: str, question: str, options=None) -> lvr.Example:
    """A question about `video` as an Example, read by `parse_row` like a dataset row (options
    lettered once, the video checked). The answer is unknown: a placeholder that both forms
    accept passes validation and is then cleared."""
    mcq = bool(options) or bool(lvr.options_in_text(question))
    row = {"problem": question, "answer": "A" if mcq else "unknown",
           "videos": os.path.basename(video), "options": list(options) if options else None,
           "problem_type": "multiple choice" if mcq else "open-ended"}
    try:
        ex = lvr.parse_row(row, os.path.dirname(os.path.abspath(video)))
    except lvr.RowError as e:
        raise ValueError(str(e)) from None
    return dataclasses.replace(ex, answer="")


class VideoQA:
    """A policy answering questions about videos through the rollout server."""

    def __init__(self, *, workdir: str | None = None, checkpoint: str | None = None,
                 num_frames: int | None = 16, fps: float | None = None,
                 max_frames: int | None = None, thinking: bool = True, max_tokens: int = 512,
                 temperature: float = 0.0, seed: int = 0, rollout_address: str = "",
                 cache_dir: str | None = None, max_model_len: int = 0):
        import ml_collections
        from transformers import AutoTokenizer

        from longrl_jax.data.frames import Sampling
        from longrl_jax.embedder import VideoEmbedder
        from longrl_jax.evaluate import load_policy
        from longrl_jax.parallel import mesh as mesh_lib
        from longrl_jax.prompts import Tokens
        from longrl_jax.rl.connection import RolloutConnection

        self.mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1})
        self.model, tok_dir = load_policy(workdir=workdir, checkpoint=checkpoint, mesh=self.mesh,
                                          rules=mesh_lib.DEFAULT_RULES)
        if tok_dir is None:
            raise ValueError("no tokenizer beside the policy (tokenizer_config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.tokens = Tokens.of(self.tokenizer)
        self.sampling = Sampling(num_frames=num_frames if not fps else None, fps=fps,
                                 max_frames=max_frames, size=self.model.cfg.vision.image_size)
        self._tmp = tempfile.mkdtemp(prefix="videoqa-")
        self.embedder = VideoEmbedder(self.model, self.mesh, self.sampling,
                                      cache_dir or os.path.join(self._tmp, "cache"),
                                      rules=mesh_lib.DEFAULT_RULES, frames_per_chunk=8,
                                      decode_batch=32)
        self.thinking, self.max_tokens = thinking, max_tokens
        self.temperature, self.seed = temperature, seed
        frames = self.sampling.num_frames or self.sampling.max_frames or 256
        rows = frames * (self.model.cfg.tokens_per_frame + 1)
        length = max_model_len or -(-(rows + 1024 + max_tokens) // 64) * 64
        config = ml_collections.ConfigDict({
            "rollout": dict(address=rollout_address or "", token="", port=0, dtype="float32",
                            max_model_len=length, block_size=32, kvcache_gib=1,
                            cpu_threads_bind=""),
            "seed": seed})
        self.connection = RolloutConnection(config, os.path.join(self._tmp, "serve"), tok_dir)
        self.connection.start(self.model)

    def ask(self, video: str, question: str, options=None) -> Answer:
        """The policy's answer; ValueError (with the reason) for a video or question that
        cannot be used."""
        from longrl_jax.data.frames import VideoError, load_frames
        from longrl_jax.prompts import decode_response, make_prompt
        ex = question_example(video, question, options)
        try:
            key, rows = self.embedder(ex.videos[0])
            frames, _ = load_frames(ex.videos[0], self.sampling, normalized=False)
        except VideoError as e:
            raise ValueError(str(e)) from None
        prompt = make_prompt(self.tokenizer, self.tokens, ex, rows, key, thinking=self.thinking)
        [[sample]] = self.connection.generate([prompt], n=1, max_tokens=self.max_tokens,
                                              temperature=self.temperature, seed=self.seed,
                                              stop_token_ids=self.tokens.stop)
        text = decode_response(self.tokenizer, sample.token_ids, self.tokens.stop)
        reasoning, answer = split_response(text)
        return Answer(reasoning, answer, text, ex.problem, frames)

    def close(self) -> None:
        import shutil
        self.connection.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "VideoQA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
