"""One tiny iteration of each cheap benchmark case (``python -m bench --quick``), checking the
shape of the results. No stock kernel; the QEMU half skips only where QEMU is not installed
(the smoke test never installs it)."""

from __future__ import annotations

import json
import math
import shutil
from types import ModuleType

import pytest

from bench import report
from bench.cases import Context, registry
from bench.inputs import Inputs
from bench.stats import CaseResult, Summary

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
