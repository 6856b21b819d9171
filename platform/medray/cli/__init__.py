"""`medray` command line: parse, call the stage's `run`, print. No logic lives here."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from medray import stages
from medray.cli import output
from medray.config import ConfigError, load_config

app = typer.Typer(
    help="medray: self-supervised medical image embeddings, similarity search and classifiers "
    "on Ray, tracked in MLflow.",
    no_args_is_help=True,
    epilog=output.EXIT_CODES,
    pretty_exceptions_enable=False,
    add_completion=False,
)

WorkdirOpt = Annotated[
    str | None, typer.Option("--workdir", "-w", help="Local path or s3://bucket/prefix.")
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="YAML config (defaults: configs/STAGE.yaml).")
]


@app.callback()
def _root() -> None:
    """Command groups: data, run, demo, models, serve, submit/jobs."""


def _stage_help() -> str:
    have = stages.available()
    return ", ".join(n if ok else f"{n} (not yet available)" for n, ok in have.items())


@app.command(
    "run",
    help=f"Run one pipeline stage, or `pipeline` for all of them in order. STAGE: {_stage_help()}, "
    "pipeline. Extra args are key.sub=value overrides (pipeline: STAGE:key=value for one stage).",
)
def run_stage(
    stage: Annotated[
        str, typer.Argument(help="pretrain, select, embed, adapt, index, heads, evaluate, pipeline")
    ],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value ...")] = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    from_stage: Annotated[
        str | None, typer.Option("--from", help="pipeline: first stage to run.")
    ] = None,
    to_stage: Annotated[
        str | None, typer.Option("--to", help="pipeline: last stage to run.")
    ] = None,
    register: Annotated[
        str | None,
        typer.Option("--register", help="pipeline: register + promote under this model name."),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show Ray's and MLflow's messages here too "
            "(otherwise they go to <workdir>/logs/STAGE-TIME.log).",
        ),
    ] = False,
) -> None:
    from medray import console

    with output.errors_as_exit():
        if stage == "pipeline":
            return _run_pipeline(overrides or [], workdir, config, from_stage, to_stage,
                                 register, verbose)  # fmt: skip
        if from_stage or to_stage or register:
            raise ConfigError("--from, --to and --register go with `medray run pipeline`")
        module = stages.load_stage(stage)
        cfg = load_config(module.Config, config, overrides or [], workdir=workdir)
        stages.check_inputs(stage, cfg)  # before the stage opens MLflow in the workdir
        with console.filtered_output(console.run_log_path(cfg.workdir, stage), verbose) as log:
            result = module.run(cfg)
            console.stop_ray(log)
        output.print_result(stage, result)


def _run_pipeline(overrides, workdir, config, from_stage, to_stage, register, verbose) -> None:
    import os

    from medray import console, pipeline

    cfg = pipeline.config_from_args(
        workdir,
        overrides,
        path=config,
        from_stage=from_stage,
        to_stage=to_stage,
        register_as=register,
    )
    output.console.print(
        f"[bold]medray pipeline[/bold] workdir={cfg.workdir} stages={','.join(cfg.selected())}"
    )
    # A missing workdir gets no logs/ made in it: the first stage says it is missing.
    show_all = verbose or not (os.path.isdir(cfg.workdir) or "://" in cfg.workdir)
    with console.filtered_output(console.run_log_path(cfg.workdir, "pipeline"), show_all) as log:
        result = pipeline.run(cfg, on_done=output.print_stage_report)
        console.stop_ray(log)
    output.print_demo_summary(result, title="pipeline summary")


def _register_groups() -> None:
    """Command groups live in their own modules; a group missing from the build is skipped."""
    import importlib

    for name in ("data", "demo", "models", "serve", "cluster"):
        try:
            mod = importlib.import_module(f"medray.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"medray.cli.{name}":
                continue
            raise
        mod.register(app)


_register_groups()


def main() -> None:
    from medray.serving import lifecycle

    try:
        app()
    except SystemExit as exc:
        lifecycle.exit_now_if_stopped(exc.code)  # serve/demo stopped by a signal: done
        raise
    except ConfigError as exc:
        output.console.print(f"[red]error:[/red] {output.one_line(exc)}")
        sys.exit(output.EXIT_BAD_INPUT)
    except Exception:  # a bug, not bad input: keep the traceback, and not exit 1 (a refusal)
        import traceback

        traceback.print_exc()
        print("medray: unexpected error (traceback above), exit 3", file=sys.stderr)
        sys.exit(output.EXIT_BUG)


__all__ = ["app", "main", "ConfigError", "WorkdirOpt", "ConfigOpt"]
