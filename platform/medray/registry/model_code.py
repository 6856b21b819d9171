"""MLflow "models from code" entry: MLflow runs this file to build the served pyfunc model."""

import mlflow

from medray.registry.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
