"""Turning state into what a person or a program reads: rich tables, or JSON-ready dicts.

64-bit values are hex strings in JSON, so no consumer loses precision to a float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vmmarch_cli.vcpu import GPR_NAMES, SEGMENT_NAMES, Regs, Segment, Sregs

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def _table(**kwargs: Any) -> Table:
    # rich is imported when a table is first drawn, not on the way to the first KVM_RUN: it is
    # the largest import of a boot (~20 ms measured with -X importtime), and a --json or
    # --quiet boot that ends well never draws one.
    from rich.table import Table

    return Table(**kwargs)


def hex64(v: int) -> str:
    return f"{v:#018x}"


def regs_dict(r: Regs) -> dict[str, str]:
    return {name: hex64(getattr(r, name)) for name in (*GPR_NAMES, "rip", "rflags")}


def segment_dict(s: Segment) -> dict[str, str]:
    return {"selector": f"{s.selector:#06x}", "base": hex64(s.base),
            "limit": f"{s.limit:#010x}", "attributes": f"{s.attributes:#06x}"}


def sregs_dict(s: Sregs) -> dict[str, Any]:
    out: dict[str, Any] = {name: segment_dict(getattr(s, name)) for name in SEGMENT_NAMES}
    out["gdt"] = {"base": hex64(s.gdt.base), "limit": f"{s.gdt.limit:#06x}"}
    out["idt"] = {"base": hex64(s.idt.base), "limit": f"{s.idt.limit:#06x}"}
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        out[name] = hex64(getattr(s, name))
    return out


def regs_table(r: Regs, title: str = "registers") -> Table:
    t = _table(title=title, show_header=False, box=None, padding=(0, 1), expand=False)
    for _ in range(6):
        t.add_column(no_wrap=True)
    names = (*GPR_NAMES, "rip", "rflags")
    for i in range(0, len(names), 3):
        row: list[str] = []
        for name in names[i : i + 3]:
            row += [f"[bold]{name}[/]", hex64(getattr(r, name))]
        t.add_row(*row)
    return t


def sregs_tables(s: Sregs) -> list[Table]:
    seg = _table(title="segments", padding=(0, 1))
    for col in ("reg", "selector", "base", "limit", "attributes"):
        seg.add_column(col, no_wrap=True)
    for name in SEGMENT_NAMES:
        d = segment_dict(getattr(s, name))
        seg.add_row(name, d["selector"], d["base"], d["limit"], d["attributes"])
    seg.add_row("gdtr", "", hex64(s.gdt.base), f"{s.gdt.limit:#06x}", "")
    seg.add_row("idtr", "", hex64(s.idt.base), f"{s.idt.limit:#06x}", "")
    ctl = _table(title="control", show_header=False, box=None, padding=(0, 2))
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        ctl.add_row(f"[bold]{name}[/]", hex64(getattr(s, name)))
    return [seg, ctl]


def kv_table(title: str, rows: Mapping[str, str] | Sequence[tuple[str, str]]) -> Table:
    t = _table(title=title, show_header=False, box=None, padding=(0, 2))
    items = rows.items() if isinstance(rows, Mapping) else rows
    for k, v in items:
        t.add_row(f"[bold]{k}[/]", v)
    return t


def stderr_console() -> Console:
    # Wide enough for three 64-bit registers per row even when stderr is a pipe; soft_wrap so a
    # long text line (a panic message, the timings) is never broken for a script to grep.
    from rich.console import Console

    return Console(stderr=True, highlight=False, width=120, soft_wrap=True)


def as_text(tables: Sequence[Table], width: int = 100) -> str:
    """``tables`` drawn as plain text (no colour, no terminal): for a debugger's console."""
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False,
                      force_terminal=False)
    for t in tables:
        console.print(t)
    return out.getvalue()
