"""The bundle as an MLflow pyfunc model, logged as "models from code" (nothing pickled).

`log_bundle_model` logs `model_code.py` (which calls `mlflow.models.set_model(BundleModel())`)
with the bundle directory as the artifact `bundle`. `mlflow.pyfunc.load_model(
"models:/<name>@<alias>")` then runs `BundleModel.load_context`, which verifies and loads the
bundle (`load_bundle`). `predict` takes a DataFrame with an `image` column (base64 or raw
bytes of PNG/JPEG/TIFF) and returns one row per image: `embedding`, `neighbours` (top `k`,
a param) and `classes`. The loaded `ServiceBundle` is `model.unwrap_python_model().bundle`.

The model's `pip_requirements` (its requirements.txt) name medray the way it is installed
where the model is logged, read from the installed distribution's PEP 610
`direct_url.json` (`medray_requirement`):

- from a git URL (`pip install git+https://...`): `medray @ git+<url>@<commit>`, the exact
  commit, installable wherever that repository is reachable;
- from a wheel or sdist at a remote URL: `medray @ <url>` (`#sha256=` when pip recorded it);
- from a local wheel file (`pip install dist/medray-*.whl`): the wheel itself is logged into
  the model (`artifacts/<wheel name>`) and that relative path is the requirement; MLflow
  installs requirements from the model directory, so the model carries its own medray;
- from a local directory, editable or not (`pip install -e .`, a development checkout):
  `medray @ file:///<checkout>`, which installs only where that path holds the checkout
  (this machine, or a cluster sharing the path), as it is at install time;
- from a package index (no direct_url.json): `medray==<version>`, resolvable on the index
  it came from (a private one: pass `--index-url` / `PIP_INDEX_URL` where it is installed);
- not installed (medray imported from a path, e.g. a Ray py_module): `medray==<version>`,
  which no public index serves; register from an installed medray instead.
Either way pip resolves medray's own dependencies (torch, ray, ...) from the index.
"""

import base64
import binascii
import json
import logging
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd

MODEL_CODE = Path(__file__).with_name("model_code.py")
ARTIFACT = "bundle"
WHEEL_ARTIFACT = "medray_wheel"
DEFAULT_K = 10
_log = logging.getLogger(__name__)


def decode_input(value: Any, row: int) -> np.ndarray:
    """One `image` cell (base64 text or raw bytes) -> uint8 (H, W, 3)."""
    from medray.data.decode import decode_image

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image row {row}: not valid base64") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(
            f"image row {row}: expected base64 text or bytes, got {type(value).__name__}"
        )
    return decode_image(bytes(value), f"image row {row}")


class BundleModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a `ServiceBundle` (embed, search, classify in one predict)."""

    bundle = None

    def load_context(self, context) -> None:
        from medray.registry.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts[ARTIFACT])

    # A DataFrame type hint: MLflow validates against the explicit `signature()` instead.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        return predict_rows(self.bundle, model_input, params)


def predict_rows(bundle, model_input, params=None) -> pd.DataFrame:
    """Input DataFrame (`image`: base64 or bytes) -> embedding, neighbours, classes per row."""
    if not isinstance(model_input, pd.DataFrame) or "image" not in model_input:
        raise ValueError("input must be a DataFrame with an `image` column (base64 images)")
    k = int((params or {}).get("k", DEFAULT_K))
    images = [decode_input(v, i) for i, v in enumerate(model_input["image"])]
    emb = bundle.embed(images)
    return pd.DataFrame(
        {
            "embedding": [row.tolist() for row in emb],
            "neighbours": bundle.search(emb, k) if len(emb) else [],
            "classes": bundle.classify(emb) if len(emb) else [],
        }
    )


def signature():
    """Input: a string column `image`; param `k` (neighbours per image)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]),
    )


def medray_requirement(dist: Any = "installed") -> tuple[str, str | None]:
    """(the pip requirement line for medray, a local wheel file to log with the model or
    None), from `dist`'s PEP 610 direct_url.json (the module doc lists each case). `dist`:
    an `importlib.metadata.Distribution`, None for "not installed", or by default the
    installed medray's."""
    from importlib import metadata

    import medray

    if dist == "installed":
        try:
            dist = metadata.distribution("medray")
        except metadata.PackageNotFoundError:
            dist = None
    if dist is None:
        return f"medray=={medray.__version__}", None
    raw = dist.read_text("direct_url.json")
    if not raw:
        return f"medray=={dist.version}", None
    info = json.loads(raw)
    url = info["url"]
    sub = f"#subdirectory={info['subdirectory']}" if info.get("subdirectory") else ""
    if "vcs_info" in info:
        vcs = info["vcs_info"]
        return f"medray @ {vcs['vcs']}+{url}@{vcs['commit_id']}{sub}", None
    if "archive_info" in info:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            path = Path(unquote(parsed.path))
            if path.suffix == ".whl" and path.is_file():
                return f"artifacts/{path.name}", str(path)
            return f"medray @ {url}", None
        archive = info["archive_info"]
        digest = (archive.get("hashes") or {}).get("sha256")
        if not digest and str(archive.get("hash", "")).startswith("sha256="):
            digest = archive["hash"].split("=", 1)[1]
        return f"medray @ {url}" + (f"#sha256={digest}" if digest and "#" not in url else ""), None
    return f"medray @ {url}{sub}", None  # dir_info: a local checkout, editable or not


def model_kwargs(bundle_dir: str) -> dict[str, Any]:
    """What `log_model` / `save_model` get: the code, the bundle (+ a local medray wheel), the
    signature and `pip_requirements` (see the module doc)."""
    line, wheel = medray_requirement()
    if line.startswith(("medray @ file:", "medray==")):
        _log.info("model requirement %r installs only where that path or index serves it", line)
    artifacts = {ARTIFACT: str(bundle_dir)}
    if wheel:
        artifacts[WHEEL_ARTIFACT] = wheel
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": artifacts,
        "signature": signature(),
        "pip_requirements": [line],
    }


def log_bundle_model(bundle_dir: str, registered_model_name: str | None = None):
    """Log the bundle as a pyfunc model in the active run (and register it); returns ModelInfo."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name="model", registered_model_name=registered_model_name, **model_kwargs(bundle_dir)
        )
