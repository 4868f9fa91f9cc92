"""``vmm-arch engine``: the emulate backend's CPU engine (which library, which patches, when it
was built, why a fallback), and building or removing it."""

from __future__ import annotations

import json
from typing import Any

import click

from vmmarch_cli.errors import BackendUnavailableError


def _library() -> Any:
    """backends.emulate.library, or exit 69 naming what is missing (it needs unicorn)."""
    from vmmarch_cli.backends.emulate import library

    library.wheel_library()  # BackendUnavailableError: unicorn is not installed
    return library


@click.group("engine", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (status).")
@click.pass_context
def engine_command(ctx: click.Context, as_json: bool) -> None:
    """Show the emulate backend's CPU engine: which library it runs on, the patches, when it
    was built, and why the wheel would be used instead.

    The engine is unicorn, built from its source with vmm-arch's patch series into the user
    cache on first use. VMMARCH_ENGINE=wheel forces the unicorn wheel's own library (slower,
    and without the patches' fixes); LIBUNICORN_PATH=DIR loads DIR/libunicorn.so.2.

    The build is profile-guided: compiled instrumented, trained on the example guests, then
    compiled again with that profile (about a minute in all, once). VMMARCH_ENGINE_PROFILE=off
    builds it untrained instead: half the time, a slower engine.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(status_command, as_json=as_json)


@engine_command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_command(as_json: bool) -> None:
    """Show which library the emulate backend would load, and why (the default subcommand)."""
    s = _library().status()
    engine = s.choice.engine
    doc = {
        "kind": str(s.choice.kind),
        "library": s.choice.library,
        "reason": s.choice.reason,
        "setting": s.setting,
        "cache": s.cache,
        "patches": [{"name": p.name, "title": p.title} for p in s.series],
        "built": None if engine is None else {
            "at": engine.built_at, "seconds": engine.build_seconds,
            "compiler": engine.compiler, "cpu": engine.cpu, "id": engine.engine_id,
            "profile": engine.profile},
        "last_failure": None if s.failure is None else {"cause": s.failure[0],
                                                          "at": s.failure[1]},
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    runs = s.choice.library or "nothing yet"
    click.echo(f"emulate backend runs on: {s.choice.kind} ({runs})")
    if s.choice.reason:
        click.echo(f"  because: {s.choice.reason}")
    if engine is not None:
        click.echo(f"  built {engine.built_at} in {engine.build_seconds:g} s by "
                   f"{engine.compiler}, for this CPU ({engine.cpu}: -march=native)")
        click.echo(f"  profile: {engine.profile}")
    if s.failure is not None:
        click.echo(f"last failed build: {s.failure[1]}: {s.failure[0]}")
    click.echo(f"cache: {s.cache}")
    click.echo(f"patch series ({len(s.series)}):")
    for p in s.series:
        click.echo(f"  {p.name}: {p.title.split(': ', 1)[-1]}")


@engine_command.command("build")
@click.option("--force", is_flag=True, help="Build again even if a cached engine passes its "
              "load check.")
@click.option("-q", "--quiet", is_flag=True, help="No status line.")
def build_command(force: bool, quiet: bool) -> None:
    """Build the engine now (it is built on first use otherwise); exit 69 with the cause when
    it cannot be built."""
    engine = _library().build(force, quiet)
    click.echo(f"vmm-arch: engine ready: {engine.library} (built {engine.built_at})", err=True)


@engine_command.command("clean")
def clean_command() -> None:
    """Remove every built engine, the kept unicorn source and the last failure from the cache;
    the next use of the emulate backend builds again."""
    try:
        removed = _library().libbuild.clean()
    except OSError as e:
        raise BackendUnavailableError(f"cannot clean the engine cache: {e}") from None
    for path in removed:
        click.echo(f"removed {path}")
