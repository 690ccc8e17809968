"""The code MLflow runs to load the registered model (MLflow's "models from code").

`registry.log_and_register` hands MLflow this file's path instead of a pickled object, so
loading the model runs this file (copied into the model) and unpickles nothing. It only names
the model class; everything else lives in `distmed.registry`.
"""

from mlflow.models import set_model

from distmed.registry import DistmedImageClassifier

set_model(DistmedImageClassifier())
