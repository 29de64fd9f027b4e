"""Small Qwen2-compatible tokenizers built offline, for tiny models in tests and the demo.

transformers 5 loads any directory whose config says `model_type: qwen2` with its own
`Qwen2Tokenizer`, which rebuilds a byte-level BPE from `vocab` + `merges` with Qwen2's
pre-tokenizer; vLLM goes through the same AutoTokenizer. So a tokenizer for a Qwen2 checkpoint
must be exactly that kind of BPE. We train one on the given words with min_frequency 1 and room
to spare, so every word (with or without its leading space) is one token, and save it through
`Qwen2Tokenizer` itself, so what we write is what every loader reads.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Control tokens (never in model text) and reasoning/format tags (kept when decoding).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen2_tokenizer(words: Iterable[str], out_dir: str | None = None,
                          extra_special: Iterable[str] = ()):
    """A `Qwen2Tokenizer` in which every word of `words` (and " word") is a single token, digits
    are single tokens (Qwen2 splits numbers into digits), and the chat, video and tag tokens are
    added tokens. Saved to `out_dir` when given. Deterministic for the same words."""
    from transformers import AddedToken, Qwen2Tokenizer

    words = sorted(set(words))
    corpus = [w for word in words for w in (word, " " + word)] + list("0123456789") + \
        [" ", "\n", "\n\n", ".", ",", ":", "?", "(", ")", "-"]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = bpe.get_vocab(), _merges(bpe)
    tok = Qwen2Tokenizer(vocab=model[0], merges=model[1], unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t in (*SPECIAL_TOKENS, *extra_special)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def _merges(bpe: Tokenizer) -> list[tuple[str, str]]:
    import json
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
