"""A host value read from tensors once per tensor object and version, not at every call.

Reading a device tensor's values on the host waits for the device. The layers of one step are passed the
same tensor objects (packed sequences' offsets, an attention mask), so what one layer read serves the
others. Entries are keyed by the tensors' ids, confirmed through weak references (tensors cannot be dict
keys by value), and hold the tensors' version counters, which in-place writes through torch ops advance:
a buffer the caller updates in place is read again. Writes that bypass the counter (through ``.data``, a
NumPy view, a collective or a custom kernel) are not seen. Inference-mode tensors have no version counter
and are read at every call.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Generic, Optional, TypeVar

import torch

T = TypeVar("T")


class ReadOnce(Generic[T]):
    def __init__(self, read: Callable[..., T]):
        self._read = read
        self._cache: Dict[tuple, tuple] = {}   # ids -> (weak references, value, versions)

    def __call__(self, *tensors: Optional[torch.Tensor]) -> T:
        """read(*tensors), from the cache where these objects were read at their current versions (None
        entries stand for absent tensors)."""
        if any(t is not None and t.is_inference() for t in tensors):
            return self._read(*tensors)
        key = tuple(id(t) for t in tensors)
        versions = tuple(None if t is None else t._version for t in tensors)
        hit = self._cache.get(key)
        if hit is None or hit[2] != versions or any(_deref(ref) is not t for ref, t in zip(hit[0], tensors)):
            # Entries whose tensors are gone (an absent tensor, None, never is).
            for stale in [k for k, (refs, *_) in self._cache.items()
                          if any(r is not None and r() is None for r in refs)]:
                del self._cache[stale]
            refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
            hit = self._cache[key] = (refs, self._read(*tensors), versions)
        return hit[1]


def _deref(ref: Optional[weakref.ref]) -> Optional[torch.Tensor]:
    return None if ref is None else ref()
