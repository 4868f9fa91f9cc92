"""Each closed set of names has one home in the code (a StrEnum), and the JSON schema and the
CLI offer exactly those names."""

from __future__ import annotations

import json

from vmmarch_cli.arch.x86_64.protocols import BootProtocol
from vmmarch_cli.loader import KernelFormat
from vmmarch_cli.stop import STATUS_FOR_REASON, StopReason

from conftest import ROOT, run_cli

SCHEMA = json.loads((ROOT / "docs" / "result.schema.json").read_text())
KERNEL = SCHEMA["properties"]["kernel"]["properties"]


def test_the_schema_documents_the_code_s_names() -> None:
    assert set(SCHEMA["properties"]["reason"]["enum"]) == set(StopReason)
    assert set(KERNEL["boot_protocol"]["enum"]) == set(BootProtocol)
    assert set(KERNEL["format"]["enum"]) == set(KernelFormat)


def test_every_stop_has_a_status_but_the_exit_port_which_carries_the_guest_s() -> None:
    assert set(STATUS_FOR_REASON) == set(StopReason) - {StopReason.EXIT_PORT}


def test_the_cli_offers_the_protocols_by_the_names_the_json_reports() -> None:
    help_text = run_cli("boot", "--help").stdout
    assert "[auto|linux64|pvh]" in help_text
    bad = run_cli("boot", "k", "--boot-protocol", "linux")
    assert bad.returncode == 64 and "'linux' is not one of 'auto', 'linux64', 'pvh'" in bad.stderr
