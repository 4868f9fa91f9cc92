"""The benchmark cases. Each module has ``NAME``, ``DEFAULTS`` and ``run(ctx) -> CaseResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from bench.inputs import Inputs
from bench.stats import CaseResult


@dataclass(frozen=True)
class Settings:
    """How much to run: recorded pairs, warm-up pairs, and whether this is a --quick run."""

    runs: int
    warmup: int
    quick: bool = False


@dataclass
class Context:
    inputs: Inputs
    settings: Settings

    def say(self, message: str) -> None:
        self.inputs.progress(message)


CaseRunner = Callable[[Context], CaseResult]


def registry() -> dict[str, ModuleType]:
    from bench.cases import (
        abstraction,
        exit_cost,
        first_run,
        gdb,
        milestones,
        rss,
        smp,
        snapshot,
        startup,
        userspace,
    )

    mods = (startup, first_run, exit_cost, abstraction, rss, milestones, smp, userspace, gdb,
            snapshot)
    return {m.NAME: m for m in mods}
