"""One tiny iteration of each cheap benchmark case (``python -m bench --quick``), checking the
shape of the results. No stock kernel, except for the ``userspace`` case's one short pair
(marked ``stock``); the QEMU half skips only where QEMU is not installed (the smoke test never
installs it)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from bench import report
from bench.cases import Context, registry
from bench.inputs import Inputs
from bench.stats import CaseResult, Summary

from conftest import needs_unicorn

pytestmark = pytest.mark.usefixtures("kvm")

#: Cheap cases and whether their B side is QEMU (else it is in-process: bare loop / raw ioctls).
CHEAP = {"startup": True, "first_run": True, "exit_cost": False, "abstraction": False,
         "rss": True}
QEMU_MISSING = shutil.which("qemu-system-x86_64") is None
_cache: dict[str, CaseResult] = {}


def _result(name: str) -> CaseResult:
    if name not in _cache:
        module: ModuleType = registry()[name]
        inputs = Inputs(lambda _message: None, install_peer=False)
        _cache[name] = module.run(Context(inputs, module.QUICK))
    return _cache[name]


def _check(summary: Summary | None) -> None:
    assert summary is not None
    as_dict = summary.__dict__
    for key in ("min", "median", "max"):
        assert key in as_dict
        assert math.isfinite(as_dict[key]) and as_dict[key] > 0
    assert summary.min <= summary.median <= summary.max
    assert summary.n >= 1


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_vmm_arch_side(name: str) -> None:
    result = _result(name)
    assert result.case == name
    assert result.tables, f"{name} produced no table"
    for table in result.tables:
        assert table.rows
        first = table.rows[0]
        _check(first.a)
        if not CHEAP[name]:  # the in-process baseline is always there
            _check(first.b)
            _check(first.ratio)
        for row in table.rows:
            assert {"metric", "unit", "a", "b", "ratio"} <= set(row.__dict__)
    text = report.render([result])
    assert name in text
    json.dumps(report.to_json([result], {}))  # serialisable


@pytest.mark.skipif(QEMU_MISSING, reason="qemu-system-x86_64 is not installed: only the "
                    "vmm-arch half ran (install qemu-system-x86)")
@pytest.mark.parametrize("name", sorted(n for n, peer in CHEAP.items() if peer))
def test_qemu_side(name: str) -> None:
    first = _result(name).tables[0].rows[0]
    _check(first.b)
    _check(first.ratio)


def test_userspace_report_checks() -> None:
    """The userspace case's guest report: a console with the expected values passes, one that
    did less work does not, and runs that disagree fail the case (no boot; the next test
    boots)."""
    from bench import userspace_guest as guest
    from bench.cases import userspace

    work = guest.QUICK
    lines = [f"{guest.RESULT_LINE} {k} {v}" for k, v in guest.expected(work).items()]
    good = "\r\n".join([*lines, f"{guest.FORKS_LINE} {work.spawned() + 50}",
                        f"{guest.SANITY_LINE} spawned={work.spawned()} results=abc",
                        guest.MARKER]).encode()
    assert guest.parse(good).problems(work) == []
    short = good.replace(f"spawn_ok {work.spawn}".encode(), f"spawn_ok {work.spawn - 1}".encode())
    assert any("spawn_ok" in p for p in guest.parse(short).problems(work))
    assert guest.parse(b"Run /init as init process\n").problems(work) == ["no sanity line"]
    a, b = userspace.Runs("A"), userspace.Runs("B")
    a.reports.append(("a.log", guest.parse(good)))
    b.reports.append(("b.log", guest.parse(good)))
    assert any(n.startswith("every run printed") for n in userspace.check_reports(work, [a, b]))
    b.reports.append(("b2.log", guest.parse(good.replace(b"results=abc", b"results=abd"))))
    with pytest.raises(RuntimeError, match="disagree"):
        userspace.check_reports(work, [a, b])


@pytest.mark.stock
@needs_unicorn
def test_userspace_quick(stock: dict[str, Path]) -> None:
    """``--cases userspace --quick``: one short pair on the stock kernel (a few seconds); the
    case itself raises if a guest did other work than expected."""
    table = _result("userspace").tables[0]
    rows = {row.metric: row for row in table.rows}
    for metric in ("run_init", "marker", "userspace", "spawn", "files"):
        _check(rows[metric].a)
        if not QEMU_MISSING:
            _check(rows[metric].b)
            _check(rows[metric].ratio)
    assert any(note.startswith("every run printed") for note in table.notes), table.notes
