"""MLflow settings checked without a server (the search against a real `mlflow server` is in
tests/test_tune_ray.py, sharing that test's one search)."""

from __future__ import annotations

import pytest

from distmed.errors import UserError
from distmed.tracking import check_mlflow_uri


def test_mlflow_uri_with_credentials_is_refused_without_repeating_them():
    with pytest.raises(UserError) as caught:
        check_mlflow_uri("https://alice:s3cret@mlflow.lab")
    assert "s3cret" not in str(caught.value) and "MLFLOW_TRACKING_TOKEN" in str(caught.value)
    check_mlflow_uri("http://127.0.0.1:5000")  # no credentials: fine
