"""No filesystem path or storage location in an HTTP answer.

A bundle's info carries where things were made (the workdir in its lineage, the weights'
directory, a bundle path as model URI, the MLflow store): useful in the registry, but in an
answer it tells a caller the server's layout. `strip_paths` drops every such field at the
API layer, whatever deployment produced it.
"""

from __future__ import annotations

import re
from typing import Any

PATH_KEYS = frozenset(
    {"workdir", "path", "paths", "uri", "uris", "bundle_path", "bundle_dir", "local_path",
     "tracking_uri", "registry_uri", "artifact_uri", "artifact_location"}
)  # fmt: skip
"""Keys whose value is a location by definition: dropped whatever they hold."""

_LOCATION = re.compile(
    r"^(/|~|\.{1,2}/|\\\\|[A-Za-z]:[\\/]"
    r"|(file|s3a?|gs|gcs|az|abfss?|hdfs|dbfs|sqlite|mysql|postgresql|mssql|https?):)"
)
"""An absolute or relative path, a Windows drive or share, or a storage/database/HTTP URL
(`models:/name@alias` and `runs:/...` are MLflow names, not locations, and stay)."""


def is_location(value: str) -> bool:
    return bool(_LOCATION.match(value.strip()))


def strip_paths(value: Any) -> Any:
    """`value` without path-valued fields: dict keys in PATH_KEYS or whose string value is
    a location are dropped, and so are location strings inside lists; the rest is kept."""
    if isinstance(value, dict):
        return {
            k: strip_paths(v)
            for k, v in value.items()
            if k not in PATH_KEYS and not (isinstance(v, str) and is_location(v))
        }
    if isinstance(value, (list, tuple)):
        return [strip_paths(v) for v in value if not (isinstance(v, str) and is_location(v))]
    return value
