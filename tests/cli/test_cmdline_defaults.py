"""The command line vmm-arch composes: defaults, host extras, user overrides."""

from pathlib import Path

from vmmarch_cli.config import BASE_CMDLINE, BootConfig
from vmmarch_cli.machine import build_cmdline

K = Path("k")


def test_hardware_kvm_gets_the_base_only() -> None:
    assert build_cmdline(BootConfig(kernel=K), emulated_ring0=False, leaked=[]) == BASE_CMDLINE


def test_emulated_ring0_extras_and_clearcpuid() -> None:
    line = build_cmdline(BootConfig(kernel=K), emulated_ring0=True, leaked=["popcnt", "xsave"])
    assert line.startswith(BASE_CMDLINE + " mitigations=off initcall_blacklist=")
    assert line.endswith(" clearcpuid=popcnt,xsave")


def test_user_settings_win() -> None:
    cfg = BootConfig(kernel=K, cmdline="console=ttyS0 mitigations=auto", append="quiet")
    line = build_cmdline(cfg, emulated_ring0=True, leaked=["popcnt"])
    assert line.split()[:2] == ["console=ttyS0", "mitigations=auto"]
    assert "mitigations=off" not in line
    assert line.endswith(" quiet")
    cfg = BootConfig(kernel=K, append="clearcpuid=cx16")
    assert "clearcpuid=popcnt" not in build_cmdline(cfg, True, ["popcnt"])


def test_clearcpuid_stays_within_the_kernels_buffer() -> None:
    names = [f"feature{i}" for i in range(40)]
    line = build_cmdline(BootConfig(kernel=K), True, names)
    value = line.split("clearcpuid=")[1].split()[0]
    assert len(value) <= 127
    assert value.split(",") == names[: len(value.split(","))]
