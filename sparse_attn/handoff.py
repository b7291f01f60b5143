"""Hand state to a transformers attention function that its caller does not pass along.

transformers calls an attention function as ``fn(module, query, key, value, attention_mask,
**kwargs)``: the cache is handed to the attention module (which calls ``cache.update`` just before
the attention function), and a training forward's extra state (which tokens each rollout kept) is
not an argument at all. Both reach the attention function through a ``Handoff``: a thread-local
slot (so concurrent forwards in other threads never see it). Two uses (docs/sparse_prefill.md):

- ``TopPCache.update`` puts (cache, layer) for the attention call that follows it in the same
  thread, which ``take``s it (sparse_attn.cache / sparse_attn.attention);
- a replay of recorded selections (sf_train.replay) ``holds`` its state for the forwards inside a
  ``with`` block; a nested block sees its own state and the outer one is restored after it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Handoff:
    """One thread-local slot holding a value or None."""

    def __init__(self, name: str):
        self.name = name
        self._local = threading.local()

    def peek(self) -> Any:
        """The value in this thread's slot (None when empty), left in place."""
        return getattr(self._local, "value", None)

    def put(self, value: Any) -> None:
        self._local.value = value

    def take(self) -> Any:
        """The value in this thread's slot (None when empty); the slot is empty afterwards."""
        value = self.peek()
        self._local.value = None
        return value

    @contextmanager
    def holding(self, value: Any) -> Iterator[Any]:
        """Put ``value`` for the block; restore whatever the slot held before, also on error."""
        previous = self.peek()
        self._local.value = value
        try:
            yield value
        finally:
            self._local.value = previous

    def __repr__(self) -> str:
        return f"Handoff({self.name!r})"
