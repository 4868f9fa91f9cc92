"""Summaries of repeated measurements and of A/B pairs."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

#: One run of one side: metric name -> value (a metric the run never reached is absent).
Sample = Mapping[str, float]


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    median: float
    max: float
    samples: tuple[float, ...] = ()

    @staticmethod
    def of(values: Sequence[float]) -> Summary | None:
        if not values:
            return None
        return Summary(len(values), min(values), statistics.median(values), max(values),
                       tuple(values))


@dataclass(frozen=True)
class Row:
    """One metric, both sides. ``ratio`` summarises per-pair ratios A/B (same round)."""

    metric: str
    unit: str
    a: Summary | None
    b: Summary | None
    ratio: Summary | None
    target: str = ""
    note: str = ""


@dataclass
class Table:
    title: str
    a_label: str
    b_label: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class CaseResult:
    case: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def paired_row(
    metric: str,
    unit: str,
    a_runs: Sequence[Sample],
    b_runs: Sequence[Sample | None],
    *,
    b_metric: str | None = None,
    target: str = "",
    note: str = "",
) -> Row:
    """Summaries of ``metric`` on each side and of A/B over the rounds where both reached it.

    ``a_runs[i]`` and ``b_runs[i]`` are the same round; a B entry may be None (no peer).
    """
    key_b = b_metric or metric
    a_vals = [r[metric] for r in a_runs if metric in r]
    b_vals = [r[key_b] for r in b_runs if r is not None and key_b in r]
    ratios = [
        a[metric] / b[key_b]
        for a, b in zip(a_runs, b_runs, strict=False)
        if b is not None and metric in a and key_b in b and b[key_b] > 0
    ]
    return Row(metric, unit, Summary.of(a_vals), Summary.of(b_vals), Summary.of(ratios),
               target, note)


def alternate(
    run_a: Callable[[], Sample],
    run_b: Callable[[], Sample] | None,
    runs: int,
    warmup: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Sample], list[Sample | None]]:
    """A B A B ...: ``warmup`` unrecorded pairs, then ``runs`` recorded ones."""
    a_runs: list[Sample] = []
    b_runs: list[Sample | None] = []
    for i in range(warmup + runs):
        recorded = i >= warmup
        label = f"run {i - warmup + 1}/{runs}" if recorded else f"warm-up {i + 1}/{warmup}"
        if progress is not None:
            progress(label)
        a = run_a()
        b = run_b() if run_b is not None else None
        if recorded:
            a_runs.append(a)
            b_runs.append(b)
    return a_runs, b_runs
