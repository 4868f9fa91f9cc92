"""Status for long phases (fetching, building the initramfs): a live rich status line on stderr
when stderr is a terminal, plain lines when it is not, nothing with --quiet.

rich honours NO_COLOR and TERM=dumb by itself; a pipe never gets a spinner or escape codes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console


@contextmanager
def status(first: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """Yields a function that replaces the status text (or prints a line when not a tty)."""
    if quiet:
        yield lambda message: None
        return
    if not sys.stderr.isatty():
        print(f"vmm-arch: {first}", file=sys.stderr, flush=True)
        yield lambda message: print(f"vmm-arch: {message}", file=sys.stderr, flush=True)
        return
    console = Console(stderr=True)
    with console.status(first) as live:
        yield lambda message: live.update(message)
