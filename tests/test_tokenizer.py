"""The offline Qwen2-compatible tokenizer: what we write is what AutoTokenizer (and so vLLM) reads."""

from hf_fixtures import qwen2_hf
from transformers import AutoTokenizer

from longrl_jax.data.tokenizer import build_qwen2_tokenizer

WORDS = ["red", "blue", "circle", "square", "appears", "before", "after", "count", "video"]


def test_words_are_single_tokens_and_reload_identically(tmp_path):
    tok = build_qwen2_tokenizer(WORDS, str(tmp_path))
    text = ("<|im_start|>user\n<video>\nDoes the red circle appear before the blue square?"
            "<|im_end|>\n<think>count 12</think><answer>B</answer>")
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    for t in ("<video>", "<think>", "</think>", "<answer>", "</answer>", "Ġred", "Ġcircle",
              "Ġblue", "Ġsquare", "Ġbefore"):
        assert t in pieces
    assert "1" in pieces and "2" in pieces  # Qwen2 splits numbers into digits
    qwen2_hf(vocab=len(tok)).save_pretrained(tmp_path)  # config.json says qwen2
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen2Tokenizer"
    assert again(text)["input_ids"] == ids
    assert again.decode(ids) == text
    assert again.eos_token == "<|im_end|>"


def test_deterministic(tmp_path):
    a = build_qwen2_tokenizer(WORDS)
    b = build_qwen2_tokenizer(list(reversed(WORDS)))
    assert a.get_vocab() == b.get_vocab()
