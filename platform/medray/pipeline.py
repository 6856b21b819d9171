"""`medray run pipeline`: every stage in data-flow order on an imported workdir.

The same code runs `medray demo` (after `data synth`, with the demo's short overrides),
`jobs/pipeline.py` on a cluster and `medray run pipeline --workdir W` on a laptop. Each
stage gets its default config, then `<config_dir>/<stage>.yaml` when that file exists,
then its overrides, exactly as `medray run STAGE` would, and shares the pipeline's
workdir, mlflow and ray sections. Finished work is skipped where the stage already can
(embed keeps its written shards, pretrain resumes from its last checkpoint).
`register_as: NAME` (`--register NAME`) ends with `models register` + `models promote`
through the gates.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field, model_validator

from medray import stages
from medray.config import StageConfig, load_config

PIPELINE: tuple[str, ...] = tuple(stages.STAGES)
"""Every stage in data-flow order (medray.stages.STAGES is ordered that way)."""


def stage_range(first: str | None = None, last: str | None = None) -> list[str]:
    """The stages from `first` to `last` inclusive, in data-flow order."""
    for name, flag in ((first, "from_stage"), (last, "to_stage")):
        if name is not None and name not in PIPELINE:
            raise ValueError(f"{flag}: unknown stage {name!r}; choose from {', '.join(PIPELINE)}")
    a = PIPELINE.index(first) if first else 0
    b = PIPELINE.index(last) if last else len(PIPELINE) - 1
    if a > b:
        raise ValueError(f"from_stage {first!r} comes after to_stage {last!r} in the pipeline")
    return list(PIPELINE[a : b + 1])


def overrides_for(overrides: list[str], stage: str) -> list[str]:
    """Overrides for one stage: plain `key=value` go to every stage, `stage:key=value` to one."""
    out = []
    for text in overrides:
        head, sep, rest = text.partition(":")
        if sep and "=" not in head and head in PIPELINE:
            if head == stage:
                out.append(rest)
        else:
            out.append(text)
    return out


class Config(StageConfig):
    """Which stages to run, and with what."""

    stages: list[str] = Field(default_factory=lambda: list(PIPELINE))
    """Stages to run, in data-flow order (from_stage/to_stage cut this list)."""
    from_stage: str | None = None
    """First stage to run (default: the first of `stages`)."""
    to_stage: str | None = None
    """Last stage to run (default: the last of `stages`)."""
    config_dir: str | None = "configs"
    """Each stage reads `<config_dir>/<stage>.yaml` when it exists (None: defaults only)."""
    per_stage: dict[str, list[str]] = Field(default_factory=dict)
    """Per-stage `key=value` overrides, applied after the stage's YAML."""
    register_as: str | None = None
    """Register the result under this model name and promote it through the gates."""

    @model_validator(mode="after")
    def _known_stages(self) -> Config:
        unknown = [s for s in self.stages if s not in PIPELINE]
        if unknown:
            raise ValueError(
                f"stages: unknown stage(s) {unknown}; choose from {', '.join(PIPELINE)}"
            )
        unknown = sorted(set(self.per_stage) - set(PIPELINE))
        if unknown:
            raise ValueError(f"per_stage: unknown stage(s) {unknown}")
        self.selected()  # from/to must name known stages, in order
        return self

    def selected(self) -> list[str]:
        """The stages this run executes, in data-flow order."""
        window = stage_range(self.from_stage, self.to_stage)
        return [s for s in PIPELINE if s in self.stages and s in window]


class StageReport(BaseModel):
    stage: str
    seconds: float
    result: dict[str, Any]


class Result(BaseModel):
    workdir: str
    reports: list[StageReport]
    metrics: dict[str, Any] = {}
    """The evaluate stage's result, when it ran."""
    model: dict[str, Any] = {}
    """The registration and promotion outcome, when `register_as` was set."""


def timed(name: str, fn: Callable[[], Any], on_done: Callable[[StageReport], None]) -> StageReport:
    start = time.perf_counter()
    result = fn()
    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result or {})
    report = StageReport(stage=name, seconds=round(time.perf_counter() - start, 1), result=data)
    on_done(report)
    return report


def shared_overrides(cfg: Config) -> list[str]:
    """The pipeline's own mlflow/ray settings that were set explicitly, as overrides for every
    stage: they refine each stage's YAML (a stage's `ray.num_workers` survives) instead of
    replacing its whole section."""
    out = []
    for section in ("mlflow", "ray"):
        for key, value in getattr(cfg, section).model_dump(mode="json", exclude_unset=True).items():
            out.append(f"{section}.{key}={json.dumps(value)}")
    return out


def stage_config(name: str, cfg: Config) -> StageConfig:
    """The stage's config: defaults, `<config_dir>/<name>.yaml`, the pipeline's mlflow/ray
    settings, the stage's overrides, the pipeline's workdir."""
    module = stages.load_stage(name)
    path = os.path.join(cfg.config_dir, f"{name}.yaml") if cfg.config_dir else None
    return load_config(
        module.Config,
        path if path and os.path.isfile(path) else None,
        shared_overrides(cfg) + cfg.per_stage.get(name, []),
        workdir=cfg.workdir,
    )


def run_one(name: str, stage_cfg: StageConfig) -> Any:
    """One stage, its inputs checked first (a missing manifest fails before MLflow opens)."""
    stages.check_inputs(name, stage_cfg)
    return stages.load_stage(name).run(stage_cfg)


def run(
    cfg: Config,
    on_done: Callable[[StageReport], None] = lambda r: None,
    prepare: Callable[[StageConfig], StageConfig] = lambda c: c,
) -> Result:
    """Run the selected stages in order, then register + promote when asked.
    Every stage config is built (and validated) before the first stage starts, so a typo in
    the last stage's overrides fails in a second, not after an hour of pretraining.
    `prepare` adapts each stage config before it runs (jobs join the surrounding cluster)."""
    names = cfg.selected()
    configs = {name: stage_config(name, cfg) for name in names}
    reports = [timed(n, lambda n=n: run_one(n, prepare(configs[n])), on_done) for n in names]
    out = Result(workdir=cfg.workdir, reports=reports)
    evaluate = next((r for r in reports if r.stage == "evaluate"), None)
    if evaluate:
        out.metrics = evaluate.result
    if cfg.register_as:
        from medray.registry import register_and_promote

        report = timed(
            "register", lambda: register_and_promote(cfg.workdir, cfg.register_as, cfg), on_done
        )
        out.reports.append(report)
        out.model = report.result
    return out


def config_from_args(
    workdir: str | None,
    overrides: Sequence[str],
    config_dir: str | None = "configs",
    stages: str | None = None,
    path: str | None = None,
    **fields: Any,
) -> Config:
    """A pipeline config from command-line arguments: `stage:key=value` goes to one stage, a
    plain `key=value` to every stage (and `workdir=`, `mlflow.*`, `ray.*` to the pipeline)."""
    names = [s.strip() for s in (stages or "").split(",") if s.strip()]
    shared = [o for o in overrides if ":" not in o.split("=", 1)[0]
              and o.split("=", 1)[0].split(".")[0] in ("workdir", "mlflow", "ray")]  # fmt: skip
    per_stage = {name: overrides_for(list(overrides), name) for name in PIPELINE}
    return load_config(
        Config, path, shared, workdir=workdir, stages=names if stages else None, config_dir=config_dir,
        per_stage=per_stage, **fields,
    )  # fmt: skip
