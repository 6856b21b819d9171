"""`medray demo`: the whole pipeline on bundled data and weights, then serve it."""

from __future__ import annotations

from typing import Annotated

import typer

from medray.cli import output


def register(app: typer.Typer) -> None:
    app.command(
        "demo",
        help="Run every stage on synthetic tiles with bundled weights, register, promote, "
        "then serve the bundle (Ctrl-C stops; --no-serve exits after the summary).",
    )(demo)


def demo(
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value ...")] = None,
    workdir: Annotated[str, typer.Option("--workdir", "-w")] = "workdir/demo",
    config: Annotated[str | None, typer.Option("--config", "-c")] = None,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve the bundle at the end.")
    ] = True,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's and MLflow's messages here too.")
    ] = False,
) -> None:
    from medray import console
    from medray import demo as demo_mod
    from medray.config import load_config
    from medray.serving import lifecycle

    with output.errors_as_exit(), lifecycle.stops_cleanly(say=output.console.print):
        cfg = load_config(demo_mod.DemoConfig, config, overrides or [], workdir=workdir)
        output.console.print(f"[bold]medray demo[/bold] workdir={cfg.workdir}")
        with console.filtered_output(console.run_log_path(cfg.workdir, "demo"), verbose):
            result = demo_mod.run(cfg, on_done=output.print_stage_report)
        output.print_demo_summary(result)
        if serve:
            from medray.serving.local import serve_demo

            serve_demo(cfg, result)
