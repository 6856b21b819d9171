"""What every `jobs/<stage>.py` does: parse, call the stage's `run`, print, clean up.

A job runs inside a Ray cluster (`ray job submit`, `medray submit`, a KubeRay
RayJob) or on a laptop; it joins the cluster it finds (`ray.address: auto`) and
otherwise starts a local Ray, exactly like `medray run`. No logic beyond that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from medray import stages, storage
from medray.config import ConfigError, StageConfig, load_config
from medray.pipeline import PIPELINE


def in_cluster() -> bool:
    """True inside a Ray job or on a node of a running cluster (`ray start`)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # pragma: no cover - Ray moved it
        return False
    return bool(read_ray_address())


def join_cluster(cfg: StageConfig) -> StageConfig:
    """Use the surrounding cluster (`auto`) unless the config names an address itself."""
    if cfg.ray.address in (None, "local") and in_cluster():
        return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": "auto"})})
    return cfg


def stage_config(
    stage: str, path: str | None, overrides: Sequence[str], workdir: str | None = None
) -> StageConfig:
    """The stage's validated config: file, then `key=value` overrides, then --workdir."""
    module = stages.load_stage(stage)
    return load_config(module.Config, path, list(overrides), workdir=workdir)


def run_stage(stage: str, cfg: StageConfig) -> dict[str, Any]:
    """Run one stage in the cluster it finds; returns its result as plain JSON data."""
    stages.check_inputs(stage, cfg)  # before the stage opens MLflow in the workdir
    result = stages.load_stage(stage).run(join_cluster(cfg))
    return result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result or {})


def report(stage: str, result: dict[str, Any]) -> None:
    """One JSON document per stage on stdout: what the job log shows and scripts parse."""
    print(json.dumps({"stage": stage, "result": result}, indent=2, default=str), flush=True)


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("-w", "--workdir", help="local path or s3://bucket/prefix")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def _shutdown() -> None:
    """Leave the cluster (a job's driver exits anyway; a local Ray is stopped)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _guarded(body) -> int:
    """Run `body`; bad input is one line on stderr and exit 2, a bug its traceback and exit 3
    (as `medray run`), and Ray is left on every path."""
    try:
        body()
        return 0
    except storage.StorageUnavailable as exc:  # infrastructure, not input: run it again
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 4
    except (ConfigError, stages.StageUnavailable, FileNotFoundError, KeyError, ValueError) as exc:
        # The same expected failures as `medray run` (bad config or input): one line, exit 2.
        if isinstance(exc, OSError) and exc.errno is not None:
            traceback.print_exc()  # raised by the OS, not by medray: show where it came from
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # a bug: its traceback, and the CLI's code for it (not Python's 1)
        traceback.print_exc()
        return 3
    finally:
        _shutdown()


def main(stage: str, argv: Sequence[str] | None = None) -> int:
    """`python jobs/<stage>.py -c configs/<stage>.yaml [key=value ...]`; returns the exit code."""
    args = _parser(f"medray {stage} job").parse_args(argv)

    def body() -> None:
        cfg = stage_config(stage, args.config, args.overrides, args.workdir)
        report(stage, run_stage(stage, cfg))

    return _guarded(body)


def pipeline_main(argv: Sequence[str] | None = None) -> int:
    """`python jobs/pipeline.py --workdir W [--stages a,b] [key=value | stage:key=value ...]`.

    medray.pipeline.run (what `medray run pipeline` runs), each stage joining the cluster it
    finds and printing its JSON document; `<config-dir>/<stage>.yaml` is read when it exists.
    """
    from medray import pipeline

    parser = _parser("medray pipeline job: every stage in order")
    parser.add_argument("--stages", default=",".join(PIPELINE), help="comma-separated, in order")
    parser.add_argument("--config-dir", default="configs", help="where <stage>.yaml files live")
    parser.add_argument("--register", help="register + promote under this model name at the end")
    args = parser.parse_args(argv)
    if args.config:
        parser.error("use --config-dir: the pipeline reads one config per stage")

    def body() -> None:
        cfg = pipeline.config_from_args(
            args.workdir, args.overrides, args.config_dir, args.stages, register_as=args.register
        )
        pipeline.run(cfg, on_done=lambda r: report(r.stage, r.result), prepare=join_cluster)

    return _guarded(body)
