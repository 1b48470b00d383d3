"""One-line notices to stderr, each printed once per process: what the library measured or decided
on the user's behalf (which kernels run, what sparse-or-dense rule applies)."""

from __future__ import annotations

import sys

_noticed: set = set()


def notice(message: str) -> None:
    """Print a one-line notice once per process."""
    if message not in _noticed:
        _noticed.add(message)
        print(f"megatron_dsv: {message}", file=sys.stderr, flush=True)
