"""The pipeline's stages in data-flow order: name -> module exposing `Config` and `run`.

Each stage module defines `Config` (a `medray.config.StageConfig` subclass) and
`run(config: Config) -> result`, where the result is a pydantic model the CLI prints.
"""

from __future__ import annotations

import importlib
from types import ModuleType

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
