"""The distribution installs one import package, vmmarch_cli (the backends as
vmmarch_cli.backends), with the engine's patch series and its notice as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_the_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    # pip builds it as a user's pip would: in an isolated environment with the setuptools
    # pyproject.toml asks for (from the package index).
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("vmm_arch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"vmmarch_cli"}
    patches = sorted(Path(ROOT, "backends", "emulate", "patches").glob("*.patch"))
    for patch in [*patches, patches[0].with_name("README.md")]:
        assert f"vmmarch_cli/backends/emulate/patches/{patch.name}" in names
