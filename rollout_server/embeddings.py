"""An LRU store of video embeddings, bounded in bytes.

Keys are chosen by the client (a content hash of what produced the embedding), so a put is
idempotent and a key always names the same rows. The least recently used entries are evicted
when a new entry would exceed the budget; an entry larger than the whole budget is refused.
"""

from __future__ import annotations

import collections
import threading

import torch


class EmbeddingStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, key: str, value: torch.Tensor) -> bool:
        """Stores `value` under `key`; False when the key was already present (kept as is)."""
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            raise MemoryError(f"embedding {key!r} has {size} bytes, more than the store's "
                              f"budget of {self.max_bytes} (--max-embedding-bytes)")
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return False
            while self._bytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = value
            self._bytes += size
            return True

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value
