"""Rendering results: text tables for the terminal, one JSON document for --json."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.stats import CaseResult, Row, Summary, Table


def _num(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "us":
        return f"{v:.1f} us"
    return f"{v:.1f} {unit}"


def _side(s: Summary | None, unit: str) -> str:
    if s is None:
        return "-"
    if s.n == 1:
        return _num(s.median, unit)
    return f"{_num(s.median, unit)} ({_num(s.min, unit)}..{_num(s.max, unit)})"


def _ratio(r: Summary | None) -> str:
    if r is None:
        return "-"
    if r.n == 1:
        return f"{r.median:.2f}x"
    return f"{r.median:.2f}x ({r.min:.2f}..{r.max:.2f})"


def render_row(row: Row) -> list[str]:
    n = max((x.n for x in (row.a, row.b) if x is not None), default=0)
    return [row.metric, _side(row.a, row.unit), _side(row.b, row.unit), _ratio(row.ratio),
            str(n), row.target, row.note]


def render(results: Sequence[CaseResult]) -> str:
    """Median (min..max) per side, and the median (min..max) of the per-pair ratios."""
    out: list[str] = []
    for case in results:
        for table in case.tables:
            out.append(f"\n== {case.case}: {table.title}")
            head = ["metric", f"A: {table.a_label}", f"B: {table.b_label}", "A/B (pairs)", "n",
                    "target", "note"]
            body = [render_row(r) for r in table.rows]
            widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
            for line in [head, *body]:
                out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                           .rstrip())
            out += [f"  * {n}" for n in table.notes]
        out += [f"  * {n}" for n in case.notes]
    return "\n".join(out)


def render_markdown(results: Sequence[CaseResult]) -> str:
    """The same tables as ``render``, as Markdown (for docs/benchmarks.md)."""
    out: list[str] = []
    for case in results:
        for table in case.tables:
            out += [f"#### {case.case}: {table.title}", "",
                    f"| metric | A: {table.a_label} | B: {table.b_label} | A/B (pairs) | n | "
                    "target | note |", "| --- | --- | --- | --- | --- | --- | --- |"]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in render_row(r)) + " |"
                    for r in table.rows]
            out += [""] + [f"- {n}" for n in table.notes] + [""]
        out += [f"- {n}" for n in case.notes]
    return "\n".join(out)


def from_json(doc: dict[str, Any]) -> list[CaseResult]:
    """Results back from ``to_json`` (to render a saved run again)."""
    def summary(d: dict[str, Any] | None) -> Summary | None:
        if d is None:
            return None
        return Summary(d["n"], d["min"], d["median"], d["max"], tuple(d["samples"]))

    cases = []
    for c in doc["cases"]:
        tables = [Table(t["title"], t["a_label"], t["b_label"],
                        [Row(r["metric"], r["unit"], summary(r["a"]), summary(r["b"]),
                             summary(r["ratio"]), r["target"], r["note"]) for r in t["rows"]],
                        list(t["notes"])) for t in c["tables"]]
        cases.append(CaseResult(c["case"], tables, list(c["notes"])))
    return cases


def kvm_users() -> int:
    """Other processes holding /dev/kvm open (other VMs compete for the same cores)."""
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == "/dev/kvm" for fd in (proc / "fd").iterdir()):
                count += 1
        except OSError:
            continue
    return count


def machine_facts() -> dict[str, Any]:
    """Where the numbers came from: CPU, cores, kernel, KVM kind, load, Python."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": model,
        "cores": os.cpu_count(),
        "kvm_pvm": Path("/sys/module/kvm_pvm").exists(),
        "loadavg": os.getloadavg(),
        "other_kvm_users_at_start": kvm_users(),
        "python": sys.version.split()[0],
    }


def to_json(results: Sequence[CaseResult], facts: dict[str, Any]) -> dict[str, Any]:
    return {"machine": facts, "cases": [dataclasses.asdict(r) for r in results]}
