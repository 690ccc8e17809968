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


def test_a_multilabel_search_logs_each_findings_auc_under_a_valid_name(tmp_path):
    """The best-of run gets every finding's CV AUC (fold mean where defined) and test AUC;
    a name MLflow would refuse is made safe instead of failing the upload."""
    pytest.importorskip("mlflow", reason="pip install mlflow (in .[dev])")
    from mlflow.tracking import MlflowClient

    from distmed.config import MlflowConfig
    from distmed.results import write_trial_detail
    from distmed.tracking import log_search_to_mlflow

    histories = [
        {"val_roc_auc": 0.7, "val_roc_auc/Edema": 0.8, "val_roc_auc/Effusion (L)": 0.6},
        {"val_roc_auc": 0.9, "val_roc_auc/Edema": 0.9, "val_roc_auc/Effusion (L)": None},
    ]
    write_trial_detail(str(tmp_path / "run" / "trials" / "cv-t1"),
                       [{"history": [h]} for h in histories])  # fmt: skip
    summary = {"best_trial": "t1", "best_cv_roc_auc": 0.8,
               "test_metrics": {"roc_auc": 0.7, "roc_auc/Edema": 0.75}}  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow 3 refuses a file store
    run_id = log_search_to_mlflow(MlflowConfig(uri=uri), "exp", tmp_path / "run", summary)
    assert run_id is not None
    logged = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    assert logged["best_cv_roc_auc/Edema"] == pytest.approx(0.85)
    assert logged["best_cv_roc_auc/Effusion _L_"] == pytest.approx(0.6)  # the defined fold
    assert logged["test_roc_auc/Edema"] == 0.75 and logged["best_cv_roc_auc"] == 0.8
