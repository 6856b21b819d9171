"""`medray submit` and `medray jobs list|logs|stop`: stages as Ray jobs on a cluster."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.table import Table

from medray.cli import output

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS).",
    ),
]

jobs_app = typer.Typer(help="Ray jobs on the cluster: list, logs, stop.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command(
        "submit",
        help="Submit STAGE (or the whole pipeline) as a Ray job; ships this checkout and the "
        "medray package. "
        "Extra args are key.sub=value overrides. With --follow, streams the log and exits "
        "with the job's exit code.",
    )(submit)
    app.add_typer(jobs_app, name="jobs")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    from medray.cluster import SubmitError

    with output.errors_as_exit():
        try:
            yield
        except (SubmitError, ConnectionError) as exc:
            output.console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None


def submit(
    stage: Annotated[
        str,
        typer.Argument(help="pretrain, select, embed, adapt, index, heads, evaluate, or pipeline"),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key.sub=value ... (pipeline: STAGE:key=value for one stage)"),
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Stage config inside this checkout.")
    ] = None,
    address: AddressOpt = None,
    workdir: Annotated[
        str | None, typer.Option("--workdir", "-w", help="s3://bucket/prefix on a cluster.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the log; exit with the job's code.")
    ] = False,
    submit_config: Annotated[
        str | None, typer.Option("--submit-config", help="YAML SubmitConfig (pip, env, ...).")
    ] = None,
    pip: Annotated[
        list[str] | None, typer.Option("--pip", help="pip requirement for a bare cluster.")
    ] = None,
) -> None:
    from medray import cluster

    with _errors():
        cfg = cluster.load_submit_config(submit_config, address=address, pip=pip)
        jobs, job_id = cluster.submit(stage, config, overrides or [], cfg, address, workdir)
        output.console.print(f"submitted [bold]{job_id}[/bold] ({stage})")
        if not follow:
            output.console.print(f"follow it: medray jobs logs {job_id} --follow")
            return
        code = _follow(jobs, job_id)
    raise typer.Exit(code)


def _follow(jobs, job_id: str) -> int:
    from medray import cluster

    try:
        code = cluster.follow(jobs, job_id)
    except KeyboardInterrupt:
        output.console.print(f"\nstopped following; the job runs on: medray jobs stop {job_id}")
        return 130
    info = jobs.get_job_info(job_id)
    colour = "green" if code == 0 else "red"
    status = getattr(info.status, "value", info.status)
    output.console.print(f"[{colour}]job {job_id}: {status} (exit {code})[/{colour}]")
    if code != 0 and info.message:  # its first clause; the log itself was streamed above
        output.console.print(info.message.split(", last available logs")[0], markup=False)
    return code


def _client(address: str | None):
    from medray import cluster

    return cluster.client(cluster.resolve_address(address))


@jobs_app.command("list", help="Jobs on the cluster, newest first.")
def list_jobs(address: AddressOpt = None) -> None:
    from medray import cluster

    with _errors():
        rows = cluster.list_jobs(_client(address))
    table = Table(title="jobs", title_justify="left")
    for col in ("id", "status", "stage", "started", "entrypoint"):
        table.add_column(col)
    for row in rows:
        started = dt.datetime.fromtimestamp(row["start_time"] / 1000, dt.timezone.utc)
        table.add_row(
            row["id"],
            row["status"],
            row["stage"],
            f"{started:%Y-%m-%d %H:%M:%S}Z",
            row["entrypoint"],
        )
    output.console.print(table)


@jobs_app.command("logs", help="A job's log; --follow streams it and exits with its code.")
def logs(
    job_id: Annotated[str, typer.Argument(help="Submission id from `medray jobs list`.")],
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
) -> None:
    with _errors():
        jobs = _client(address)
        if not follow:
            output.console.print(jobs.get_job_logs(job_id), end="", markup=False)
            return
        code = _follow(jobs, job_id)
    raise typer.Exit(code)


@jobs_app.command("stop", help="Stop a running job.")
def stop(
    job_id: Annotated[str, typer.Argument(help="Submission id from `medray jobs list`.")],
    address: AddressOpt = None,
) -> None:
    with _errors():
        stopped = _client(address).stop_job(job_id)
    output.console.print(f"{job_id}: {'stop requested' if stopped else 'not running'}")
