"""What a user meets first: --help everywhere, completion, plain output when piped."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from vmmarch_cli.cli import COMMANDS

from conftest import run_cli


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command: str) -> None:
    p = run_cli(command, "--help")
    assert p.returncode == 0, p.stderr
    assert "Usage: vmm-arch " + command in p.stdout
    assert len(p.stdout.splitlines()) > 5


def test_top_level_help_lists_commands_and_exit_statuses() -> None:
    p = run_cli("--help")
    assert p.returncode == 0
    for command in COMMANDS:
        assert command in p.stdout
    for status in ("64", "65", "69", "70", "124", "130", "255"):
        assert status in p.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_listed_summary_is_the_commands_own(command: str) -> None:
    """`vmm-arch --help` lists the summaries in cli.COMMANDS without importing the commands;
    each must be the first sentence of the command's own help."""
    module, attr, summary = COMMANDS[command]
    own = getattr(importlib.import_module(module), attr)
    assert own.get_short_help_str(limit=10_000) == summary


def test_top_level_help_imports_no_command() -> None:
    p = subprocess.run([sys.executable, "-c", "import sys; from vmmarch_cli.cli import main\n"
                        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                        "print(sorted(m for m in sys.modules if m.startswith('vmmarch_cli.')))"],
                       capture_output=True, text=True, timeout=60)
    loaded = p.stdout.strip().splitlines()[-1]
    assert "commands." not in loaded and "machine" not in loaded, loaded


def test_shell_completion_script() -> None:
    p = run_cli(env={"_VMM_ARCH_COMPLETE": "bash_source"})
    assert p.returncode == 0
    assert "_vmm_arch_completion" in p.stdout


def test_piped_output_has_no_escape_codes(guests: dict[str, object]) -> None:
    p = run_cli("backends")
    assert "\x1b[" not in p.stdout


def test_long_result_lines_are_never_wrapped(capsys: pytest.CaptureFixture[str]) -> None:
    from vmmarch_cli.commands.boot import report
    from vmmarch_cli.machine import BootResult

    line = "[  609.5] Kernel panic - not syncing: " + "x" * 300
    report(BootResult(reason="panic", status=255, detail=line,
                      timings={f"phase{i}": 1.0 for i in range(30)}), quiet=False, verbose=False)
    err = capsys.readouterr().err
    assert f"vmm-arch: panic (status 255): {line}\n" in err
