"""Data: LongVideo-Reason reading, video decoding, the synthetic suite, tokenizers, caches."""
