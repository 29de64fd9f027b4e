"""Prompts: a question's chat-templated ids with its video spliced in, and responses as ids.

One `Prompt` per question: its chat-templated ids, its `SpliceLayout` (the video rows spliced at
the placeholder, one separator per frame) and the key of its video embedding. The rollout request
(`rl/rollout.py`) and the trainer's batch (`batch.py`) are both built from the same `Prompt`, so
the video sits at the same place, with the same positions, on both sides (Long-RL places it
differently for rollout and training; we must not).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from longrl_jax.data.longvideo_reason import VIDEO_TOKEN, Example
from longrl_jax.models.splice import SpliceLayout, splice_layout


@dataclasses.dataclass(frozen=True)
class Tokens:
    """The token ids a run needs from its tokenizer."""
    video: int
    separator: int
    stop: tuple[int, ...]          # ids that end a response (<|im_end|>, <|endoftext|>)

    @classmethod
    def of(cls, tokenizer) -> "Tokens":
        video = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        sep = tokenizer.encode("\n", add_special_tokens=False)
        if len(sep) != 1:
            raise ValueError(f"the tokenizer splits the frame separator '\\n' into {sep}")
        stop = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
                     if t in tokenizer.get_vocab())
        return cls(video=int(video), separator=int(sep[0]), stop=stop)


@dataclasses.dataclass
class Prompt:
    """One question ready for both sides: the server gets `layout.segments()` with the video
    referenced by `video_key`, the trainer splices `video` at `layout.video_rows`."""
    example: Example
    ids: np.ndarray             # chat-templated prompt ids, one video placeholder
    layout: SpliceLayout        # the prompt with the video's rows spliced in
    video_key: str              # names the embedding on the server and in the cache
    video: np.ndarray           # [F * tokens_per_frame, D] video rows
    # Qwen2.5-VL (M-RoPE) only: the video's grid in patch units, as transformers' and vLLM's
    # `video_grid_thw` (rows = t * h * w / merge^2), and seconds per temporal patch. None for
    # LongVILA (1-D RoPE). The embedder fills them; positions and the rollout request read them.
    video_grid_thw: tuple[int, int, int] | None = None
    second_per_grid_t: float | None = None


def prompt_ids(tokenizer, example: Example, thinking: bool = True) -> np.ndarray:
    ids = tokenizer.apply_chat_template(example.messages(thinking), add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return np.asarray(ids, np.int32)


def make_prompt(tokenizer, tokens: Tokens, example: Example, video_rows_fpd: np.ndarray,
                video_key: str, *, thinking: bool = True) -> Prompt:
    ids = prompt_ids(tokenizer, example, thinking)
    f, tpf, d = video_rows_fpd.shape
    layout = splice_layout(ids, video_token_id=tokens.video, frames_per_video=[f],
                           tokens_per_frame=tpf, separator_id=tokens.separator)
    return Prompt(example, ids, layout, video_key, video_rows_fpd.reshape(f * tpf, d))


def response_ids(tokenizer, text: str, tokens: Tokens) -> np.ndarray:
    """A target completion as ids, ending with the stop token (what the policy must emit)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(list(ids) + [tokens.stop[0]], np.int32)


def decode_response(tokenizer, token_ids, stop: tuple[int, ...]) -> str:
    """A sampled response as text, stop tokens removed (what rewards and reports read)."""
    return tokenizer.decode([t for t in token_ids if t not in stop], skip_special_tokens=False)
