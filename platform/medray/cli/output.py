"""How the CLI shows results and errors (rich tables on a terminal, plain lines in CI)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from medray.config import ConfigError

console = Console(stderr=False, highlight=False, soft_wrap=True)


def to_plain(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    return obj


def print_result(title: str, result: Any) -> None:
    """A result as a two-column table (nested values as compact JSON)."""
    data = to_plain(result)
    if not isinstance(data, dict):
        console.print(data)
        return
    at_k = {k: v for k, v in data.items() if _is_at_k(v)}
    # A stage's own multi-line text table (select's ranking) is printed as it is, after the
    # box it would wrap in; the list of row dicts it renders stays out of the box.
    text_blocks = [v for v in data.values() if isinstance(v, str) and "\n" in v]
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")  # a path or id is never cut to `…`
    for key, value in data.items():
        if key in at_k or value in text_blocks or _is_rows(value):
            continue
        for name, text in flat_rows(str(key), value):
            table.add_row(name, text)
    console.print(table)
    for key, value in at_k.items():
        console.print(retrieval_table(value, f"{title}: {key}"))
    for text in text_blocks:
        console.print(text)


def flat_rows(key: str, value: Any, depth: int = 3) -> list[tuple[str, str]]:
    """(dotted key, text) rows for one value: nested mappings become one row per scalar
    (`tasks.tissue.macro_f1`), lists of scalars a comma list, anything deeper a short note;
    never a JSON blob in a cell."""
    if isinstance(value, dict) and value and depth > 0:
        return [row for k, v in value.items() for row in flat_rows(f"{key}.{k}", v, depth - 1)]
    if isinstance(value, dict):
        return [(key, "-" if not value else f"{{{len(value)} keys}} (in the MLflow run)")]
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return [(key, ", ".join(_scalar(v) for v in value) or "-")]
        return [(key, f"[{len(value)} items] (in the MLflow run)")]
    return [(key, _scalar(value))]


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return (
            f"{value:.4g}"
            if abs(value) >= 1e4 or (value and abs(value) < 1e-3)
            else f"{value:.4f}".rstrip("0").rstrip(".")
        )
    return "-" if value is None else str(value)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def rounded(value: Any, digits: int = 4) -> Any:
    """Floats (also inside dicts and lists) to `digits` decimals, for display only."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def _is_at_k(value: Any) -> bool:
    """{"p@1": 0.9, "map@10": 0.8, ...}: shown as a table with one row per K."""
    return isinstance(value, dict) and len(value) > 1 and all("@" in str(k) for k in value)


EXIT_REFUSED = 1
"""`medray models promote`: the version failed a gate; production did not move."""
EXIT_BAD_INPUT = 2
"""Bad input or something missing (config key, workdir, store, model, version, inputs of a
stage): one line says what and how to fix it."""
EXIT_BUG = 3
"""Anything unexpected: the traceback is printed (please report it)."""
EXIT_UNAVAILABLE = 4
"""Object storage stayed unreachable through every retry: nothing is wrong with the input;
run the same command again once it is back (stages resume)."""
EXIT_CODES = (
    "Exit codes: 0 done (also a clean stop of serve/demo on Ctrl-C or SIGTERM); "
    "1 promotion refused by its gates; 2 bad input or something missing (one line says "
    "what and how to fix it); 3 unexpected error (traceback); 130/143 stopped by "
    "SIGINT/SIGTERM before serving started; 4 storage unreachable after retries (run again)."
)

NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
"""MLflow error codes that mean the user named something the store does not hold."""


def one_line(text: object, limit: int = 600) -> str:
    """`text` on one line (whitespace collapsed), cut at `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _mlflow_not_found(exc: BaseException) -> str | None:
    """One line for an MLflow "no such model/version/alias" error, else None."""
    errors = sys.modules.get("mlflow.exceptions")
    if errors is None or not isinstance(exc, errors.MlflowException):
        return None
    if getattr(exc, "error_code", None) not in NOT_FOUND_CODES:
        return None
    where = ""
    with contextlib.suppress(Exception):
        where = f" in {sys.modules['mlflow'].get_registry_uri()}"
    return (
        f"{one_line(exc.message)}{where}; `medray models list NAME --workdir W` shows the "
        "versions and aliases of NAME (check --workdir / MLFLOW_TRACKING_URI point at the "
        "store that registered it)"
    )


def _storage_unavailable(exc: BaseException) -> bool:
    """medray.storage.StorageUnavailable, without importing storage (pyarrow) to ask."""
    storage = sys.modules.get("medray.storage")
    return storage is not None and isinstance(exc, storage.StorageUnavailable)


@contextlib.contextmanager
def errors_as_exit() -> Iterator[None]:
    """Expected failures print one red line and exit 2; bugs keep their traceback."""
    from medray.stages import StageUnavailable

    try:
        yield
    except (ConfigError, StageUnavailable, FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        console.print(f"[red]error:[/red] {one_line(msg)}")
        sys.stdout.flush()
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception as exc:
        if _storage_unavailable(exc):
            again = "" if "again" in str(exc) else "; run the same command again once it is back"
            console.print(f"[red]error:[/red] {one_line(exc)}{again}")
            sys.stdout.flush()
            raise typer.Exit(EXIT_UNAVAILABLE) from None
        msg = _mlflow_not_found(exc)
        if msg is None:
            raise
        console.print(f"[red]error:[/red] {msg}")
        sys.stdout.flush()
        raise typer.Exit(EXIT_BAD_INPUT) from None


METRIC_NAMES = {"avg": "AvG", "p": "P", "map": "mAP", "mmv": "mMV", "ndcg": "NDCG"}


def retrieval_table(metrics: dict[str, float], title: str) -> Table:
    """{"p@5": .., "map@10": ..} as one row per K, one column per metric."""
    names = list(dict.fromkeys(key.split("@")[0] for key in metrics if "@" in key))
    ks = sorted({int(key.split("@")[1]) for key in metrics if "@" in key})
    table = Table(title=title, title_justify="left")
    table.add_column("K", justify="right")
    for name in names:
        table.add_column(METRIC_NAMES.get(name, name), justify="right")
    for k in ks:
        row = [metrics.get(f"{name}@{k}") for name in names]
        table.add_row(str(k), *["-" if v is None else f"{v:.3f}" for v in row])
    return table


def _brief(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_stage_report(report: Any) -> None:
    """One line per finished stage, with its headline numbers."""
    brief = {
        k: _brief(v)
        for k, v in report.result.items()
        if not isinstance(v, (dict, list))
        and not k.endswith(("_uri", "run_id"))
        and "\n" not in str(v)
    }
    text = ", ".join(f"{k}={v}" for k, v in list(brief.items())[:8])
    console.print(f"[green]✓[/green] {report.stage:<9} {report.seconds:>7.1f}s  {text}")


def print_demo_summary(result: Any, title: str = "demo summary") -> None:
    """The demo's (and pipeline's) closing table: stage timings, then the evaluation metrics."""
    table = Table(title=title, title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for report in result.reports:
        table.add_row(report.stage, f"{report.seconds:.1f}")
    console.print(table)
    retrieval = result.metrics.get("retrieval") or {}
    if retrieval:
        console.print(retrieval_table(retrieval, "retrieval (test split vs gallery)"))
    pair = result.metrics.get("pair") or {}
    if pair:
        console.print(
            f"pair verification (test): accuracy {pair['accuracy']:.3f} "
            f"at cosine threshold {pair['threshold']:.3f} (chosen on {pair['threshold_from']})"
        )
    if result.model:
        m = result.model
        line = f"registered: {m.get('name')} version {m.get('version')}, {m.get('outcome')}"
        if m.get("outcome") == "promoted":
            line += f" ({m.get('model_uri')}); serve it with `medray serve --workdir "
            line += f"{result.workdir} model_name={m.get('name')}`"
        console.print(line)
        for gate in m.get("failing_gates") or []:
            console.print(f"  gate not passed: {gate}")
