"""``python -m fuzz TARGET [--runs N] [--seconds S]``: a coverage-guided atheris campaign.

Inputs that crash are written to fuzz/crashes/TARGET-<sha1>; keep each as a regression test in
tests/loader/test_fuzz_parsers.py once fixed. ``python -m fuzz --list`` names the targets.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from fuzz import targets

CRASHES = Path(__file__).resolve().parent / "crashes"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    p.add_argument("target", nargs="?", choices=sorted(targets.TARGETS))
    p.add_argument("--runs", type=int, default=100_000, help="inputs to try (default 100000)")
    p.add_argument("--seconds", type=int, default=0, help="stop after this long (0: no limit)")
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    args = p.parse_args(argv)
    if args.list or args.target is None:
        for name, fn in targets.TARGETS.items():
            print(f"{name:18} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    try:
        import atheris
    except ImportError:
        print("fuzz: atheris is not installed: pip install atheris", file=sys.stderr)
        return 69
    target = targets.TARGETS[args.target]
    corpus = Path(tempfile.mkdtemp(prefix=f"vmmarch-fuzz-{args.target}-"))
    for i, seed in enumerate(targets.seeds(args.target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    CRASHES.mkdir(exist_ok=True)
    def one(data: bytes) -> None:
        try:
            target(data)
        except Exception:
            name = CRASHES / f"{args.target}-{hashlib.sha1(data).hexdigest()}"
            name.write_bytes(data)
            print(f"fuzz: crash saved to {name}", file=sys.stderr)
            raise

    libfuzzer = [sys.argv[0], str(corpus), f"-runs={args.runs}", "-print_final_stats=1",
                 f"-artifact_prefix={CRASHES}/"]
    if args.seconds:
        libfuzzer.append(f"-max_total_time={args.seconds}")
    atheris.instrument_all()
    atheris.Setup(libfuzzer, one)
    atheris.Fuzz()  # libFuzzer exits the process itself, printing its final stats
    return 0


if __name__ == "__main__":
    sys.exit(main())
