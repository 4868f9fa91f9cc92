"""``python -m bench``: run the benchmark cases, print tables, optionally write JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import inputs as inputs_module
from bench import report
from bench.cases import Context, Settings, registry
from bench.cases import milestones as milestones_case
from bench.cases import rss as rss_case
from bench.cases import smp as smp_case
from bench.inputs import Inputs
from bench.stats import CaseResult

#: Cases too slow for --quick unless named with --cases (they boot the stock kernel).
SLOW = ("milestones", "smp", "userspace", "gdb")


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {', '.join(unknown)} "
                         f"(known: {', '.join(known)})")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cases = list(registry())
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark vmm-arch side by side with QEMU (A B A B ... pairs; median of "
                    "per-pair ratios vmm-arch / QEMU).")
    p.add_argument("--quick", action="store_true",
                   help="one tiny iteration of each cheap case (skips milestones, smp, "
                        "userspace and gdb unless named with --cases)")
    p.add_argument("--cases", default="", help=f"comma-separated subset of: {', '.join(cases)}")
    p.add_argument("--skip", default="", help="comma-separated cases to leave out")
    p.add_argument("--runs", type=int, help="recorded pairs per case (default: per case)")
    p.add_argument("--warmup", type=int, help="unrecorded warm-up pairs (default: per case)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write all results as JSON")
    p.add_argument("--no-peer", action="store_true", help="do not look for or install QEMU")
    p.add_argument("--milestone-configs", default=",".join(milestones_case.CONFIGS),
                   help="milestones configurations to run (default: %(default)s)")
    p.add_argument("--smp-configs", default=",".join(f"{c}x{m}" for c, m in smp_case.CONFIGS),
                   help="smp configurations as VCPUSxMIB (default: %(default)s)")
    p.add_argument("--rss-peer-guest", choices=("tiny", "stock"), default="tiny",
                   help="what QEMU runs in the rss case (default: %(default)s)")
    p.add_argument("--libunicorn", type=Path, metavar="DIR",
                   help="run vmm-arch's emulate backend with DIR/libunicorn.so.2 instead of "
                        "its engine (VMMARCH_ENGINE=wheel in the environment: the wheel's)")
    args = p.parse_args(argv)
    lib_name = inputs_module.LIBUNICORN_NAME
    if args.libunicorn is not None and not (args.libunicorn / lib_name).is_file():
        p.error(f"--libunicorn: no {lib_name} in {args.libunicorn}")
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be 0 or more")
    selected = _names(args.cases, cases, "case") if args.cases else [
        c for c in cases if not (args.quick and c in SLOW)]
    skip = _names(args.skip, cases, "case") if args.skip else []
    args.selected = [c for c in selected if c not in skip]
    args.configs = tuple(_names(args.milestone_configs, milestones_case.CONFIGS,
                                "milestone configuration"))
    try:
        args.smp_configs = tuple((int(c), int(m)) for c, m in (
            item.strip().split("x") for item in args.smp_configs.split(",") if item.strip()))
    except ValueError:
        p.error("--smp-configs takes VCPUSxMIB items, e.g. 1x256,2x256,1x4096")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds, so the harness kills the process it runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    milestones_case.SELECTED = args.configs
    smp_case.SELECTED = args.smp_configs
    rss_case.PEER_GUEST = args.rss_peer_guest
    inputs_module.LIBUNICORN = args.libunicorn.resolve() if args.libunicorn else None
    inputs_module.byte_compile()
    inputs = Inputs(progress, want_peer=not args.no_peer)
    facts = report.machine_facts()
    qemu = inputs.qemu()
    facts["libunicorn"] = inputs_module.engine_choice()
    facts["qemu"] = qemu.version if qemu is not None else f"unavailable: {inputs.qemu_error}"
    modules = registry()
    results: list[CaseResult] = []
    failed: list[str] = []
    for name in args.selected:
        module = modules[name]
        base: Settings = module.QUICK if args.quick else module.DEFAULTS
        settings = dataclasses.replace(
            base,
            runs=args.runs if args.runs is not None else base.runs,
            warmup=args.warmup if args.warmup is not None else base.warmup)
        progress(f"case {name}: {settings.runs} run(s) after {settings.warmup} warm-up(s)")
        try:
            result: CaseResult = module.run(Context(inputs, settings))
        except Exception as e:  # one broken case must not lose the others' results
            traceback.print_exc()
            failed.append(name)
            result = CaseResult(name, notes=[f"FAILED: {type(e).__name__}: {e}"])
        results.append(result)
        print(report.render([result]), flush=True)
    facts["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(results, facts), indent=2) + "\n")
        progress(f"wrote {args.json}")
    if failed:
        progress(f"failed cases: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
