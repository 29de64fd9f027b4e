"""The splice layout shared by rollout prompts and trainer prefill."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longrl_jax.models import VLM, ModelConfig
from longrl_jax.models.splice import splice_embeddings, splice_layout

V, SEP = 9, 5


def test_layout_places_frames_and_separators():
    lay = splice_layout([1, 2, V, 3], video_token_id=V, frames_per_video=[2], tokens_per_frame=3,
                        separator_id=SEP)
    assert lay.length == 3 + 2 * (3 + 1)
    assert lay.token_ids.tolist() == [1, 2, 0, 0, 0, SEP, 0, 0, 0, SEP, 3]
    assert lay.video_rows.tolist() == [-1, -1, 0, 1, 2, -1, 3, 4, 5, -1, -1]
    kinds = [(k, v.tolist() if k == "ids" else v) for k, v in lay.segments()]
    assert kinds == [("ids", [1, 2]), ("video", (0, 3)), ("ids", [SEP]), ("video", (3, 6)),
                     ("ids", [SEP, 3])]


def test_two_videos_and_no_separator():
    lay = splice_layout([V, 7, V], video_token_id=V, frames_per_video=[1, 2], tokens_per_frame=2,
                        separator_id=None)
    assert lay.video_rows.tolist() == [0, 1, -1, 2, 3, 4, 5]
    assert lay.token_ids.tolist() == [0, 0, 7, 0, 0, 0, 0]


def test_placeholder_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="1 video placeholder.*2 video"):
        splice_layout([1, V], video_token_id=V, frames_per_video=[1, 1], tokens_per_frame=2,
                      separator_id=SEP)


def test_vlm_forward_uses_the_layout():
    cfg = ModelConfig.tiny(vocab_size=64).replace(video_token_id=V, separator_token_id=SEP)
    model = VLM(cfg, rngs=nnx.Rngs(0))
    frames = jnp.asarray(np.random.RandomState(0).randn(3, 32, 32, 3).astype(np.float32))
    video = model.encode_video(frames)  # [3, 4, 64]
    lay = splice_layout([1, 2, V, 4], video_token_id=V, frames_per_video=[3],
                        tokens_per_frame=cfg.tokens_per_frame, separator_id=SEP)
    logits = model(jnp.asarray(lay.token_ids)[None], jnp.asarray(lay.video_rows)[None],
                   video.reshape(-1, video.shape[-1]))
    # The same sequence assembled by hand: text, then per frame its rows and the "\n" embedding.
    emb = model.llm.embed
    pieces = [emb(jnp.asarray([[1, 2]]))[0]]
    for f in range(3):
        pieces += [video[f], emb(jnp.asarray([[SEP]]))[0]]
    pieces.append(emb(jnp.asarray([[4]]))[0])
    manual = model.llm(inputs_embeds_btd=jnp.concatenate(pieces)[None])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(manual), rtol=0, atol=0)


def test_splice_embeddings_numpy_and_batched():
    text = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)
    rows = np.array([[-1, 0, 1, -1], [0, -1, -1, 1]])
    video = np.array([[100, 100], [200, 200]], np.float32)
    out = splice_embeddings(text, video, rows)
    assert out[0, 1].tolist() == [100, 100] and out[1, 3].tolist() == [200, 200]
    assert out[0, 0].tolist() == text[0, 0].tolist()
