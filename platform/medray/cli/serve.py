"""`medray serve`: run the Serve application on this machine until Ctrl-C."""

from __future__ import annotations

from typing import Annotated

import typer

from medray.cli import output


def register(app: typer.Typer) -> None:
    app.command(
        "serve",
        help="Serve the registered model (models:/<name>@production by default) over HTTP: "
        "search, classify, compare, a web page at / and the API at /docs. Extra args are "
        "key.sub=value overrides (e.g. model_alias=candidate port=8080).",
    )(serve)


def serve(
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value ...")] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="YAML config (configs/serve.yaml).")
    ] = None,
    workdir: Annotated[
        str | None, typer.Option("--workdir", "-w", help="Workdir whose MLflow holds the model.")
    ] = None,
) -> None:
    from medray.config import load_config
    from medray.serving import lifecycle
    from medray.serving.config import ServeConfig
    from medray.serving.local import check_model, serve_until_stopped, start

    with output.errors_as_exit(), lifecycle.stops_cleanly(say=output.console.print):
        cfg = load_config(ServeConfig, config, overrides or [], workdir=workdir)
        check_model(cfg)  # a wrong name or store: one line, exit 2, before Ray is imported
        output.console.print(f"[bold]medray serve[/bold] {cfg.model_uri()}")
        served = start(cfg)
        output.console.print(
            f"serving at {served.url}  (page {served.url}/, API {served.url}/docs)"
        )
        output.console.print(f"API keys: {served.keys.source}")
        output.console.print(f"model {served.cfg.model_uri()}")
        serve_until_stopped(cfg, served, say=output.console.print)
