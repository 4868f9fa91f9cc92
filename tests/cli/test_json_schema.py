"""Real --json outputs of the project's guests validate against docs/result.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from conftest import ROOT, run_cli

SCHEMA = json.loads((ROOT / "docs" / "result.schema.json").read_text())

pytestmark = pytest.mark.usefixtures("kvm")


def validate(doc: dict) -> None:  # type: ignore[type-arg]
    jsonschema.validate(doc, SCHEMA)


def test_schema_is_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize(("guest", "status", "reason"), [
    ("bootcheck", 0, "exit-port"),
    ("triplefault", 70, "fault"),
    ("pvhcheck", 0, "exit-port"),
])
def test_guest_results_validate(guests: dict[str, Path], guest: str, status: int,
                                reason: str) -> None:
    p = run_cli("boot", str(guests[guest]), "--backend", "kvm", "--json", "--quiet",
                "--timeout", "60")
    doc = json.loads(p.stdout)
    validate(doc)
    assert (p.returncode, doc["status"], doc["reason"]) == (status, status, reason)


def test_timeout_result_validates(guests: dict[str, Path]) -> None:
    p = run_cli("boot", str(guests["spin"]), "--backend", "kvm", "--json", "--quiet",
                "--timeout", "0.2")
    doc = json.loads(p.stdout)
    validate(doc)
    assert doc["reason"] == "timeout" and p.returncode == 124


def test_schema_rejects_a_wrong_document() -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate({"status": "0", "reason": "fine"})
