"""The bundle as an MLflow pyfunc model, logged as "models from code" (nothing pickled).

`log_bundle_model` logs `model_code.py` (which calls `mlflow.models.set_model(BundleModel())`)
with the bundle directory as the artifact `bundle`. `mlflow.pyfunc.load_model(
"models:/<name>@<alias>")` then runs `BundleModel.load_context`, which verifies and loads the
bundle (`load_bundle`). `predict` takes a DataFrame with an `image` column (base64 or raw
bytes of PNG/JPEG/TIFF) and returns one row per image: `embedding`, `neighbours` (top `k`,
a param) and `classes`. The loaded `ServiceBundle` is `model.unwrap_python_model().bundle`.
"""

import base64
import binascii
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

MODEL_CODE = Path(__file__).with_name("model_code.py")
ARTIFACT = "bundle"
DEFAULT_K = 10


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


def log_bundle_model(bundle_dir: str, registered_model_name: str | None = None):
    """Log the bundle as a pyfunc model in the active run (and register it); returns ModelInfo."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT: str(bundle_dir)},
            signature=signature(),
            registered_model_name=registered_model_name,
            pip_requirements=["medray"],
        )
