"""`medray models register|promote|rollback|list`: the MLflow model registry from the shell.

Parse, call medray.registry, print. A refused promotion prints its failing gates and exits 1.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from medray.cli import output

group = typer.Typer(
    help="Registered service bundles: register, promote (gated), rollback, list.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(help="Registered model name.")]
WorkdirOpt = Annotated[
    str | None,
    typer.Option("--workdir", "-w", help="Workdir (its mlflow.db is the default store)."),
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="Registry config YAML (configs/registry.yaml).")
]


def _config(config: str | None, workdir: str | None):
    from medray.config import load_config
    from medray.registry import RegistryConfig

    return load_config(RegistryConfig, config, [], workdir=workdir)


def _existing_store(config: str | None, workdir: str | None):
    """The registry config, once its MLflow store is known to exist: a wrong --workdir is one
    line in a fraction of a second, before the registry imports torch and MLflow."""
    from medray import tracking

    cfg = _config(config, workdir)
    tracking.existing_tracking_uri(cfg.mlflow, cfg.workdir)
    return cfg


def gates_table(decision: dict) -> Table:
    table = Table(title=f"gates for version {decision['version']}", title_justify="left")
    for col in ("metric", "gate", "candidate", "limit", "result", "reason"):
        table.add_column(col)
    for r in decision["gates"]:
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        verdict = "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]"
        table.add_row(
            r["metric"], r["kind"], fmt(r["value"]), fmt(r["limit"]), verdict, r["reason"]
        )
    return table


def follow_note(name: str, alias: str) -> str:
    """How long until a running `medray serve` of this alias serves the new version."""
    from medray.serving.config import ServeConfig

    every = ServeConfig().follow_interval_s
    return (
        f"a running `medray serve` of models:/{name}@{alias} swaps to it within {every:g} s "
        "plus the load (serve config follow_interval_s); `serve deploy` apps: deploy again"
    )


def register_cmd(
    workdir: Annotated[str, typer.Option("--workdir", "-w", help="Workdir whose parts to bundle.")],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Model name (default: config's name).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Bundle the workdir's backbone, index, heads and metrics as a new version (alias candidate)."""
    from medray import registry

    with output.errors_as_exit():
        cfg = _config(config, workdir)
        version = registry.register(workdir, name or cfg.name, cfg)
        output.print_result("registered", {"name": name or cfg.name, "version": version,
                                           "alias": cfg.candidate_alias})  # fmt: skip


def promote_cmd(
    name: NameArg,
    version: Annotated[int, typer.Option("--version", "-v", help="Version to promote.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Move production even if gates fail (recorded as forced)."),
    ] = False,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Check the gates against production; move the production alias only if all pass."""
    from medray import registry

    with output.errors_as_exit():
        cfg = _existing_store(config, workdir)
        decision = registry.promote(name, version, cfg, force=force)
    output.console.print(gates_table(decision))
    outcome = decision["outcome"]
    if outcome == "refused":
        failing = [
            f"{r['metric']} ({r['kind']}): {r['reason']}"
            for r in decision["gates"]
            if not r["passed"]
        ]
        output.console.print(f"[red]refused:[/red] version {version} failed {len(failing)} gate(s); "
                             f"{cfg.production_alias} stays at version {decision['from_version']}")  # fmt: skip
        for line in failing:
            output.console.print(f"  - {line}")
        raise typer.Exit(1)
    was = decision["from_version"]
    output.console.print(f"{outcome}: {cfg.production_alias} -> version {version}"
                         + (f" (was {was})" if was is not None else " (first production version)"))  # fmt: skip
    output.console.print(follow_note(name, cfg.production_alias))


def rollback_cmd(name: NameArg, workdir: WorkdirOpt = None, config: ConfigOpt = None) -> None:
    """Move production back to the version that held it before the current one."""
    from medray import registry

    with output.errors_as_exit():
        cfg = _existing_store(config, workdir)
        decision = registry.rollback(name, cfg)
    output.console.print(f"rolled back: {cfg.production_alias} -> version {decision['version']} "
                         f"(was {decision['from_version']})")  # fmt: skip
    output.console.print(follow_note(name, cfg.production_alias))


def list_cmd(
    name: NameArg,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Versions with aliases, key metrics and promotion history."""
    from medray import registry

    with output.errors_as_exit():
        cfg = _existing_store(config, workdir)
        rows = registry.list_versions(name, cfg)
    if as_json:
        output.console.print_json(json.dumps(rows))
        return
    keys = list(dict.fromkeys([*cfg.gates.min, *cfg.gates.max_regression]))
    table = Table(title=f"{name}: versions", title_justify="left")
    for col in ("version", "aliases", "created", "backbone", *keys, "last decision"):
        table.add_column(col)
    for r in rows:
        own = [d for d in r["decisions"] if d["version"] == r["version"]]
        last = own[-1]["outcome"] if own else "-"
        vals = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys]
        table.add_row(
            str(r["version"]),
            ",".join(r["aliases"]) or "-",
            r["created"],
            str(r["backbone_id"]),
            *vals,
            last,
        )
    output.console.print(table)
    history = Table(title=f"{name}: promotion history", title_justify="left")
    for col in ("when", "action", "version", "from", "outcome", "who", "failing gates"):
        history.add_column(col)
    events = {json.dumps(d, sort_keys=True): d for r in rows for d in r["decisions"]}.values()
    for d in sorted(events, key=lambda d: d["when"]):
        failing = ", ".join(g["metric"] for g in d["gates"] if not g["passed"]) or "-"
        history.add_row(
            d["when"],
            d["action"],
            str(d["version"]),
            str(d["from_version"]),
            d["outcome"],
            d["who"],
            failing,
        )
    output.console.print(history)


def register(app: typer.Typer) -> None:
    """Add the `models` group to the medray CLI."""
    group.command("register")(register_cmd)
    group.command("promote")(promote_cmd)
    group.command("rollback")(rollback_cmd)
    group.command("list")(list_cmd)
    app.add_typer(group, name="models")
