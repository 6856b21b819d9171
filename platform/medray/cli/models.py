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


def identity_table(title: str, header: list[str], rows: list[list[str]], keep: set[str]) -> Table:
    """A table whose `keep` columns (which version is which: version, alias, outcome) are
    never cut or folded mid-word: they get their longest cell's width, the rest wrap."""
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(header):
        if col in keep:
            width = max([len(col), *(len(r[i]) for r in rows)])
            table.add_column(col, no_wrap=True, min_width=width)
        else:
            table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*r)
    return table


def list_cmd(
    name: Annotated[
        str | None, typer.Argument(help="Registered model name (none: list every model).")
    ] = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Versions with aliases, key metrics and promotion history (no name: every model)."""
    from medray import registry

    with output.errors_as_exit():
        cfg = _existing_store(config, workdir)
        rows = registry.list_versions(name, cfg) if name else registry.list_models(cfg)
    if as_json:
        output.console.print_json(json.dumps(rows))
    elif name is None:
        output.console.print(models_table(rows))
    else:
        keys = list(dict.fromkeys([*cfg.gates.min, *cfg.gates.max_regression]))
        output.console.print(versions_table(name, rows, keys, output.console.width))
        output.console.print(history_table(name, rows))


def models_table(rows: list[dict]) -> Table:
    header = ["name", "versions", "latest", "aliases"]
    cells = [[r["name"], str(r["versions"]), str(r["latest"]),
              ", ".join(f"{a}={v}" for a, v in r["aliases"].items()) or "-"] for r in rows]  # fmt: skip
    table = identity_table("registered models", header, cells, set(header))
    if not rows:
        table.caption = "none yet: `medray models register --workdir W --name NAME`"
    return table


def versions_table(name: str, rows: list[dict], keys: list[str], width: int) -> Table:
    """One row per version; on a narrow terminal the backbone id (long, low value) is left
    out and the creation time cut to the day, so the identity columns keep their width."""
    narrow = width < 120
    header = ["version", "aliases", "created", *([] if narrow else ["backbone"]), *keys,
              "last decision"]  # fmt: skip
    cells = []
    for r in rows:
        own = [d for d in r["decisions"] if d["version"] == r["version"]]
        vals = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys]
        created = r["created"][:10] if narrow else r["created"]
        backbone = [] if narrow else [str(r["backbone_id"])]
        cells.append([str(r["version"]), ",".join(r["aliases"]) or "-", created, *backbone,
                      *vals, own[-1]["outcome"] if own else "-"])  # fmt: skip
    keep = {"version", "aliases", "created", "last decision"}
    return identity_table(f"{name}: versions", header, cells, keep)


def history_table(name: str, rows: list[dict]) -> Table:
    header = ["when", "action", "version", "from", "outcome", "who", "failing gates"]
    events = {json.dumps(d, sort_keys=True): d for r in rows for d in r["decisions"]}.values()
    cells = []
    for d in sorted(events, key=lambda d: d["when"]):
        failing = ", ".join(g["metric"] for g in d["gates"] if not g["passed"]) or "-"
        when = d["when"][:16].replace("T", " ")  # to the minute: the full stamp is in --json
        cells.append([when, d["action"], str(d["version"]), str(d["from_version"]),
                      d["outcome"], d["who"], failing])  # fmt: skip
    keep = {"when", "action", "version", "from", "outcome"}
    return identity_table(f"{name}: promotion history", header, cells, keep)


def register(app: typer.Typer) -> None:
    """Add the `models` group to the medray CLI."""
    group.command("register")(register_cmd)
    group.command("promote")(promote_cmd)
    group.command("rollback")(rollback_cmd)
    group.command("list")(list_cmd)
    app.add_typer(group, name="models")
