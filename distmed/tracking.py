"""Experiment trackers, from the Tune driver, only when asked for: Weights & Biases, MLflow,
and TensorBoard event files for every trial.

Tune's `WandbLoggerCallback` receives each trial's results on the driver (rank 0's metrics,
forwarded by Ray Train), so no worker talks to W&B. Without a project no W&B code runs.
The API key stays in the environment: it is never put into configs, logs or results, nor
into a Ray runtime environment (Ray's runtime-env agent logs those in plain text): the
logging actor reads it from its node (a local instance inherits the driver's environment;
on a cluster, set WANDB_API_KEY on the head node or run `wandb login` there).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from distmed import _ray_compat
from distmed.config import MlflowConfig, WandbConfig
from distmed.errors import UserError
from distmed.uris import check_no_credentials

log = logging.getLogger(__name__)
# Files of a finished search logged to MLflow's summary run (those that exist).
MLFLOW_ARTIFACTS = (
    "best_model.pt",
    "report.html",
    "summary.json",
    "trials.csv",
    "best_config.yaml",
)


def wandb_callbacks(cfg: WandbConfig, group: str, run_dir: Path) -> list[Any]:
    """`[WandbLoggerCallback]` for `cfg.project`, grouped by experiment; `[]` when unset.

    W&B's files (offline runs included) go under `run_dir`, beside the search results.
    """
    if not cfg.project:
        return []
    # Tune's logging actors may have been started with another environment (an existing
    # cluster), so the mode travels explicitly rather than through WANDB_MODE.
    mode = cfg.mode or os.environ.get("WANDB_MODE") or "online"
    os.environ["WANDB_MODE"] = mode  # the callback's API-key lookup is skipped when offline
    try:
        import wandb  # noqa: F401  (the callback imports it lazily; fail here, clearly)
    except ImportError as exc:
        raise UserError(
            "tracking.wandb.project is set but wandb is not installed: pip install wandb"
        ) from exc
    return [
        _callback_class()(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            # Trial configs only hold sampled hyperparameters: nothing secret to exclude,
            # but keep Ray's bookkeeping keys out of the W&B config panel.
            excludes=["time_this_iter_s", "checkpoint_path"],
            upload_checkpoints=False,
            mode=mode,
            dir=str(run_dir),
            # At the end (or a Ctrl-C) Tune waits at most this long (s) for the logging actors
            # to finish, not 30 minutes; what is not uploaded by then stays in run_dir for
            # `wandb sync`. Every actor is told to finish first (below), so the wait ends when
            # they have: 10 s lost an offline run's last metrics on a loaded machine.
            upload_timeout=int(os.environ.get("DISTMED_WANDB_UPLOAD_TIMEOUT_S", "120")),
        )
    ]


def _callback_class() -> type:
    """Tune's `WandbLoggerCallback`, minus the API key in its logging actor's runtime env."""
    import ray
    from ray.air.integrations.wandb import WandbLoggerCallback

    class NodeKeyWandbLoggerCallback(WandbLoggerCallback):
        # Overrides a private method, reads two private attributes (_ray_compat.PRIVATE_NAMES):
        # Tune offers no public way to start its logging actor without the key in its env.
        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            if not self._remote_logger_class:  # Ray's own would add env_vars={WANDB_API_KEY}
                self._remote_logger_class = ray.remote(
                    num_cpus=0,
                    **_ray_compat.force_on_current_node(),
                    max_restarts=-1,
                    max_task_retries=-1,
                )(self._logger_actor_cls)
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

        def on_experiment_end(self, trials, **info):
            # Tune tells a trial's logging actor to finish only when the trial ends: after a
            # Ctrl-C the running trials' actors would wait on their queues until Ray's wait
            # timed out and killed them. An actor that was told already ignores the second end.
            for trial in list(self._trial_logging_actors):
                try:
                    self._signal_logging_actor_stop(trial=trial)
                except Exception as exc:  # its queue's actor died with a node: Ray's wait
                    # below then kills the logger; the search's results must still be written.
                    log.warning("W&B: could not finish the run of trial %s: %s", trial, exc)
            super().on_experiment_end(trials, **info)

    return NodeKeyWandbLoggerCallback


def tensorboard_callbacks() -> list[Any]:
    """Tune's TensorBoard logger: event files in every trial's folder of the experiment.

    Tune adds it by itself unless TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is set; named here so
    the files are there either way (tensorboardX comes with Ray Tune).
    """
    from ray.tune.logger import TBXLoggerCallback

    return [TBXLoggerCallback()]


def tensorboard_command(experiment_uri: str) -> str:
    return f"tensorboard --logdir {experiment_uri}"


def mlflow_callbacks(cfg: MlflowConfig, experiment: str) -> list[Any]:
    """`[MLflowLoggerCallback]`: one MLflow run per trial (its sampled parameters, per-epoch
    metrics, final CV score) in the MLflow experiment `cfg.experiment` or `experiment`;
    `[]` when no URI is set.

    No token is handed to the callback: Tune pickles its callbacks into the search state it
    saves beside the results, so a `tracking_token` would land in a file. MLflow's client
    reads MLFLOW_TRACKING_TOKEN (or _USERNAME/_PASSWORD) from the driver's environment, and
    the callback runs in the driver, so no Ray runtime environment carries it either.
    """
    if not cfg.uri:
        return []
    check_mlflow_uri(cfg.uri)
    try:
        import mlflow  # noqa: F401  (the callback imports it lazily; fail here, clearly)
    except ImportError as exc:
        raise UserError(
            "tracking.mlflow.uri is set but mlflow is not installed: pip install mlflow"
        ) from exc
    return [
        _mlflow_callback_class()(
            tracking_uri=cfg.uri,
            experiment_name=cfg.experiment or experiment,
            tags={"distmed.experiment": experiment},
        )
    ]


def check_mlflow_uri(uri: str) -> None:
    """Refuse a URI with credentials in it: the config is saved with every result."""
    check_no_credentials(uri, "tracking.mlflow.uri / --mlflow-uri")


def _mlflow_callback_class() -> type:
    """Tune's `MLflowLoggerCallback` plus the trial's final CV score and status; metric
    names made safe for MLflow (`mlflow_key`)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class CVMLflowLoggerCallback(MLflowLoggerCallback):
        def log_trial_result(self, iteration: int, trial, result: dict):
            # A finding's AUC ("cv_roc_auc/<finding>") under a name MLflow accepts.
            super().log_trial_result(
                iteration, trial, {mlflow_key(k): v for k, v in result.items()}
            )

        def log_trial_end(self, trial, failed: bool = False):
            run_id = _ray_compat.mlflow_trial_run_id(self, trial)
            last = trial.last_result or {}
            if run_id is not None:
                score = last.get("cv_roc_auc")
                if last.get("cv_complete") and score is not None:
                    self.mlflow_util.log_metrics(
                        run_id=run_id, metrics_to_log={"final_cv_roc_auc": score}, step=0
                    )
                state = "completed" if last.get("cv_complete") else "stopped"
                _ray_compat.mlflow_client(self).set_tag(run_id, "distmed.status", state)
            super().log_trial_end(trial, failed)

    return CVMLflowLoggerCallback


def log_search_to_mlflow(
    cfg: MlflowConfig, experiment: str, run_dir: Path, summary: dict[str, Any]
) -> str | None:
    """One MLflow run `best-of-<experiment>` holding the best configuration, its CV and test
    scores, and the best model, report (with its figures) and result files as artefacts.
    Returns the run id; None when MLflow is not asked for or the upload failed (the search's
    results are saved already; a warning says so)."""
    if not cfg.uri:
        return None
    try:
        return _log_search(cfg, experiment, run_dir, summary)
    except Exception as exc:  # a tracker outage must not lose a finished search
        log.warning("MLflow: logging the search's results failed (%s: %s)", type(exc).__name__, exc)
        return None


def mlflow_key(key: str) -> str:
    """`key` as an MLflow metric name: characters MLflow refuses (it takes letters, digits,
    `_ - . / :` and spaces) become `_`, so a finding named "Effusion (L)" cannot make the
    whole upload fail."""
    return re.sub(r"[^\w\-. /:]", "_", key, flags=re.ASCII)


def finding_cv_aucs(run_dir: Path, best_trial: str | None) -> dict[str, float]:
    """A multi-label search's best trial: each finding's ROC-AUC, the mean over its folds
    where defined (`best_cv_roc_auc/<finding>`), from the trial's saved fold histories;
    empty for a single-label search or without them."""
    from distmed.results import read_trial_detail

    if not best_trial:
        return {}
    detail = read_trial_detail(str(run_dir / "trials" / f"cv-{best_trial}"))
    lasts = [f["history"][-1] for f in (detail or {}).get("folds", []) if f.get("history")]
    prefix = "val_roc_auc/"
    keys = sorted({k for last in lasts for k in last if k.startswith(prefix)})
    out = {}
    for key in keys:
        values = [v for last in lasts if math.isfinite(v := last.get(key, math.nan))]
        if values:
            out[f"best_cv_roc_auc/{key[len(prefix) :]}"] = sum(values) / len(values)
    return out


def _log_search(cfg: MlflowConfig, experiment: str, run_dir: Path, summary: dict) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.uri)
    name = cfg.experiment or experiment
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run = client.create_run(
        experiment_id,
        run_name=f"best-of-{experiment}",
        tags={"distmed.experiment": experiment, "distmed.role": "best"},
    )
    run_id = run.info.run_id
    for key, value in summary.get("best_params", {}).items():
        client.log_param(run_id, key, value)
    if summary.get("best_trial"):
        client.set_tag(run_id, "distmed.best_trial", summary["best_trial"])
    scores = {"best_cv_roc_auc": summary.get("best_cv_roc_auc")}
    scores.update(finding_cv_aucs(run_dir, summary.get("best_trial")))
    # A multi-label model's test metrics hold each finding's AUC ("roc_auc/Edema").
    scores.update({f"test_{k}": v for k, v in (summary.get("test_metrics") or {}).items()})
    for key, value in scores.items():
        if isinstance(value, int | float) and math.isfinite(value):
            client.log_metric(run_id, mlflow_key(key), float(value))
    for file in MLFLOW_ARTIFACTS:
        if (run_dir / file).is_file():
            client.log_artifact(run_id, str(run_dir / file))
    if (run_dir / "report").is_dir():
        client.log_artifacts(run_id, str(run_dir / "report"), artifact_path="report")
    if cfg.uri and cfg.registered_model and (run_dir / "best_model.pt").is_file():
        _register(cfg.uri, cfg.registered_model, run_id, run_dir / "best_model.pt")
    client.set_terminated(run_id)
    return run_id


def _register(uri: str, name: str, run_id: str, best_model: Path) -> None:
    """The best model as a registered pyfunc model `name` (a new version), logged in the
    best-of run; a failure is a warning: the run and its artefacts are logged already."""
    try:
        import mlflow

        from distmed.registry import log_and_register

        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            model_uri = log_and_register(best_model, name)
        print(f"MLflow: registered the best model as {model_uri}")
    except Exception as exc:  # the registry (or its storage) down: the search is saved
        log.warning("MLflow: registering %s failed (%s: %s)", name, type(exc).__name__, exc)
