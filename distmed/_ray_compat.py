"""Every private or internal Ray name distmed uses, each behind one small function, with why.

Ray is pinned to `>=2.60,<2.61` (pyproject.toml); `tests/test_ray_compat.py` checks, without
starting Ray, that each name below still exists in the installed Ray, so a Ray upgrade that
renames one fails that fast test instead of a search. A missing name is an error here, never a
silently skipped step: two of these (`forwarded_env_vars`, `pending_reports`) guard secrets and
a hang. Imports are inside the functions, as they were at the call sites: Tune's tracker
integrations and Train's v2 internals are heavy, and not every process needs them.

`PRIVATE_NAMES` lists them all, as `module:attribute` paths, for the test and for a reviewer.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

# (module, dotted attribute) pairs; an attribute after "#" is read on an instance or inside a
# method's source rather than on the module (see tests/test_ray_compat.py).
PRIVATE_NAMES: tuple[str, ...] = (
    "ray:init#_node_ip_address",
    "ray._private.services:get_ray_address_from_environment",
    "ray._private.state:state.get_max_resources_from_cluster_config",
    "ray.tune.execution.class_cache:ENV_VARS_TO_PROPAGATE",
    "ray.train.v2._internal.exceptions:WorkerGroupStartupTimeoutError",
    "ray.train.v2._internal.execution.context:__file__",
    "ray.tune.integration.ray_train:TuneReportCallback#_training_actor_item_queue",
    "ray.tune.tune:_setup_signal_catching#SIGUSR1",
    "ray.tune.tune:_setup_signal_catching#TUNE_DISABLE_SIGINT_HANDLER",
    "ray.air.util.node:_force_on_current_node",
    "ray.air.integrations.wandb:WandbLoggerCallback._start_logging_actor",
    "ray.air.integrations.wandb:WandbLoggerCallback._logger_actor_cls",
    "ray.air.integrations.wandb:WandbLoggerCallback#_remote_logger_class",
    "ray.air.integrations.wandb:WandbLoggerCallback._signal_logging_actor_stop",
    "ray.air.integrations.wandb:WandbLoggerCallback#_trial_logging_actors",
    "ray.air.integrations.mlflow:MLflowLoggerCallback#_trial_runs",
    "ray.air._internal.mlflow:_MLflowLoggerUtil._get_client",
    "ray.train.v2.api.data_parallel_trainer:DataParallelTrainer._register_sigint_handler",
    "ray.train._internal.storage:logger",
    "ray.data._internal.execution.streaming_executor:logger",
)

# Tune's driver stops a search on this signal the way its own Ctrl-C handler does (saves the
# experiment state, then stops the trials); distmed's Ctrl-C handler sends it (search.py).
TUNE_STOP_SIGNAL = signal.SIGUSR1
# Ray's loggers that log a traceback for every failed write into the experiment folder: each
# snapshot of the search state (every TUNE_GLOBAL_CHECKPOINT_S), the last one, Tune's
# TensorBoard writer, Train's storage set-up (an internal module's logger). A folder made
# read-only or full mid-search repeats the same traceback many times (failures.py quiets them).
RAY_WRITE_LOGGERS = (
    "ray.tune.execution.experiment_state",
    "ray.tune.tune",
    "ray.tune.logger.tensorboardx",
    "ray.train._internal.storage",
)
# Ray Data's executor logs three INFO lines per dataset run (start, plan, "finished"): the
# streamed loader drops those of its own datasets (distmed.data.stream.quiet_stream_logs).
RAY_DATA_EXECUTOR_LOGGER = "ray.data._internal.execution.streaming_executor"
# Tune installs no SIGINT handler of its own while this is set (distmed installs one instead).
TUNE_DISABLE_SIGINT_HANDLER = "TUNE_DISABLE_SIGINT_HANDLER"


def node_ip_init_kwargs(host: str) -> dict[str, Any]:
    """`ray.init` keywords that pin the new node's address to `host`.

    Why private: `ray.init` has no public keyword for it, and a local instance must register
    under the address that RAY_ADDRESS already names (resources.start_local_ray).
    """
    return {"_node_ip_address": host}


def ray_address_from_environment(address: str) -> str | None:
    """Ray's own resolution of `--address auto` (RAY_ADDRESS, then the host's latest
    cluster); None when nothing is running. Why private: Ray exposes no public lookup.

    Raises:
        ConnectionError: as Ray does, when the recorded cluster is gone.
    """
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment(address, None)


def autoscaler_max_resources() -> dict[str, Any]:
    """The autoscaler's maximum cluster resources as the GCS reports them (KubeRay, v2).

    Why private: it is the same source Ray Train's own start-up check reads; nothing public
    says what an autoscaling cluster may grow to.
    """
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config() or {}


def forwarded_env_vars() -> set[str]:
    """The live set of environment variable names Tune copies into every trial actor's
    runtime env (`class_cache.ENV_VARS_TO_PROPAGATE`); the caller removes secrets from it.

    Why private: Ray offers no switch for it, and runtime envs end up in a world-readable log.

    Raises:
        TypeError: the pinned Ray no longer keeps a set there (the scrub cannot work).
    """
    from ray.tune.execution import class_cache

    forwarded = class_cache.ENV_VARS_TO_PROPAGATE
    if not isinstance(forwarded, set):
        raise TypeError(
            "ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE is a "
            f"{type(forwarded).__name__}, not a set: distmed cannot keep secrets out of Tune's "
            "runtime envs with this Ray; use the Ray version pyproject.toml pins"
        )
    return forwarded


def worker_group_startup_timeout_error() -> type[BaseException]:
    """Ray Train v2's error for a worker group that never started.

    Why internal: v2 raises it (as a `TrainingFailedError`'s controller failure) but does not
    export it, and it is the one failure distmed explains in its own words (cv.py).
    """
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return WorkerGroupStartupTimeoutError


def train_report_logger_name() -> str:
    """The logger Ray Train 2.60 logs every `ray.train.report` under, at INFO.

    Why internal: it is named by its file's path, not by a public module name.
    """
    from ray.train.v2._internal.execution import context

    return context.__file__


def pending_reports(to_tune: Any) -> Any:
    """The queue through which `TuneReportCallback` hands Train's reports to the trial.

    Why private: the Ray 2.60 end-of-trial race (search.wait_until_tune_took_every_report)
    can only be waited out by watching it; the callback offers no public handle.

    Raises:
        AttributeError: the callback has no such queue (a Ray this workaround does not fit).
    """
    try:
        return to_tune._training_actor_item_queue
    except AttributeError as exc:
        raise AttributeError(
            f"{type(to_tune).__name__} has no _training_actor_item_queue: the wait for Tune's "
            "last report does not fit this Ray; use the Ray version pyproject.toml pins"
        ) from exc


def force_on_current_node() -> dict[str, Any]:
    """Actor options that place an actor on this node (Tune's own logging actors use it).

    Why private: the W&B logging actor must run where the API key is, without the key in its
    runtime env (tracking.py); this is the helper Tune uses for the same placement.
    """
    from ray.air.util.node import _force_on_current_node

    options = _force_on_current_node()  # given no function, the options dict
    assert isinstance(options, dict)
    return options


def mlflow_trial_run_id(callback: Any, trial: Any) -> str | None:
    """The MLflow run `MLflowLoggerCallback` opened for `trial`; None before it opened one.

    Why private: the callback keeps its trial -> run map to itself, and the final CV score
    and status must go to that same run (tracking.py).
    """
    return callback._trial_runs.get(trial)


def mlflow_client(callback: Any) -> Any:
    """The `MlflowClient` behind `MLflowLoggerCallback` (its util hides it behind `_get_client`),
    for a tag its util has no method for."""
    return callback.mlflow_util._get_client()


@contextlib.contextmanager
def train_keeps_ctrl_c() -> Iterator[None]:
    """While open, a Ray Train fit in this process leaves the SIGINT handler as it is.

    Why private: `DataParallelTrainer.fit` on the main thread installs its own SIGINT handler
    (`_register_sigint_handler`) and never puts the old one back. Its first Ctrl-C asks the
    controller to abort and then exits with status 0; every Ctrl-C after the fit only logs
    "Gracefully aborting the training run" and is otherwise swallowed, so a Ctrl-C while the
    report is written did nothing. Ray offers no switch for it. With this open, Ctrl-C raises
    `KeyboardInterrupt` in the fit as anywhere else (the driver's exit stops its actors).
    """
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    name = "_register_sigint_handler"
    original = DataParallelTrainer.__dict__[name]  # KeyError: a Ray this does not fit
    setattr(DataParallelTrainer, name, lambda self, controller: None)
    try:
        yield
    finally:
        setattr(DataParallelTrainer, name, original)
