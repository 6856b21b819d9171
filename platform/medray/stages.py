"""The pipeline's stages in data-flow order: name -> module exposing `Config` and `run`.

Each stage module defines `Config` (a `medray.config.StageConfig` subclass) and
`run(config: Config) -> result`, where the result is a pydantic model the CLI prints.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

STAGES: dict[str, str] = {
    "pretrain": "medray.pretrain",
    "select": "medray.select",
    "embed": "medray.embed",
    "adapt": "medray.adapt",
    "index": "medray.index",
    "heads": "medray.heads",
    "evaluate": "medray.evaluate",
}


class StageUnavailable(RuntimeError):
    """A stage whose module is not part of this build yet."""


def load_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    try:
        return importlib.import_module(STAGES[name])
    except ModuleNotFoundError as exc:
        if exc.name == STAGES[name]:
            raise StageUnavailable(f"stage {name!r} is not available yet in this build") from exc
        raise


def available() -> dict[str, bool]:
    """Which stages this build has (for `medray --help` and the demo)."""
    return {name: importlib.util.find_spec(mod) is not None for name, mod in STAGES.items()}


NEEDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("manifest",),
    "select": ("manifest",),
    "embed": ("manifest",),
    "adapt": ("embeddings",),
    "index": ("embeddings",),
    "heads": ("embeddings",),
    "evaluate": ("embeddings", "index"),
}
"""What each stage reads from the workdir before it writes anything."""


def check_inputs(name: str, cfg: Any) -> None:
    """Raise FileNotFoundError (one line: what is missing, which command makes it) unless
    the workdir holds what stage `name` reads. Called before the stage opens MLflow, so a
    mistyped --workdir gets nothing created in it (no mlflow.db, no directory)."""
    from medray import storage
    from medray import workdir as wd

    workdir = storage.resolve(cfg.workdir)
    if not storage.is_s3(workdir) and not os.path.isdir(workdir):
        raise FileNotFoundError(
            f"{workdir}: no such workdir; check --workdir, or start one with "
            f"`medray data synth --workdir {workdir}` or `medray data import ... --workdir {workdir}`"
        )
    needs = NEEDS.get(name, ())
    if "manifest" in needs and not storage.exists(wd.manifest(workdir)):
        raise FileNotFoundError(
            f"{wd.manifest(workdir)}: no manifest; import images first with `medray data import "
            f"folder|csv|npz SOURCE --workdir {workdir}` (or `medray data synth --workdir {workdir}`)"
        )
    if "embeddings" in needs:
        bid = wd.current_backbone_id(workdir, getattr(cfg, "backbone_id", None))
        summary = storage.join(wd.embeddings(workdir, bid), "embed.json")
        if not storage.exists(summary):
            raise FileNotFoundError(
                f"{summary}: no embeddings for backbone {bid}; run "
                f"`medray run embed --workdir {workdir}` (or fix backbone_id)"
            )
        if "index" in needs:
            meta = storage.join(wd.index(workdir, bid), "index.json")
            if not storage.exists(meta):
                raise FileNotFoundError(
                    f"{meta}: no index for backbone {bid}; run `medray run index --workdir {workdir}`"
                )
