"""Status for long phases (fetching, building the initramfs): a live rich status line on stderr
when stderr is a terminal, plain lines when it is not, nothing with --quiet.

rich honours NO_COLOR and TERM=dumb by itself; a pipe never gets a spinner or escape codes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def status(first: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """Yields a function that replaces the status text (or prints a line when not a tty).
    ``first`` is shown until the first update; empty: nothing until then."""
    if quiet:
        yield lambda message: None
        return
    if not sys.stderr.isatty():
        yield _plain_lines(first)
        return
    from rich.console import Console  # ~20 ms of import, for a terminal only

    console = Console(stderr=True)
    with console.status(first) as live:
        yield lambda message: live.update(message)


def _plain_lines(first: str) -> Callable[[str], None]:
    """Plain ``vmm-arch:`` lines, one per step: a message that only updates the step before it
    (the same text up to ``: ``, as "compiling: 12/75" after "compiling: 4/75") is not
    printed, so a log gets the phases and not every count."""
    last = [first]
    if first:
        print(f"vmm-arch: {first}", file=sys.stderr, flush=True)

    def say(message: str) -> None:
        if message.partition(": ")[0] != last[0].partition(": ")[0]:
            print(f"vmm-arch: {message}", file=sys.stderr, flush=True)
        last[0] = message

    return say
