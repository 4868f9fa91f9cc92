"""Where the guest spends its time: RIP samples folded onto kernel symbols.

Symbols come from a file in /proc/kallsyms or System.map format ("ADDRESS TYPE NAME"), e.g.
the guest's own /proc/kallsyms, or ``kallsyms-finder`` run on a stripped vmlinux.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from vmmarch_cli.errors import BadInputError


class Symbols:
    def __init__(self, entries: list[tuple[int, str]]) -> None:
        entries.sort()
        self._addresses = [a for a, _ in entries]
        self._names = [n for _, n in entries]

    @classmethod
    def load(cls, path: Path) -> Symbols:
        entries: list[tuple[int, str]] = []
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as e:
            raise BadInputError(f"{path}: cannot read symbols: {e.strerror}") from None
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[1].lower() in "tw":  # text symbols only
                try:
                    entries.append((int(parts[0], 16), parts[2]))
                except ValueError:
                    continue
        if not entries:
            raise BadInputError(f"{path}: no text symbols in kallsyms/System.map format")
        return cls(entries)

    def function(self, address: int) -> str:
        i = bisect.bisect(self._addresses, address) - 1
        return self._names[i] if i >= 0 else f"{address:#x}"


def fold(samples: Mapping[int, int], symbols: Symbols | None) -> Counter[str]:
    """Sample counts per function (per address when there are no symbols)."""
    out: Counter[str] = Counter()
    for rip, n in samples.items():
        out[symbols.function(rip) if symbols else f"{rip:#018x}"] += n
    return out
