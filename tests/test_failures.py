"""Why a trial or a run failed, behind Ray's wrappers: the exceptions are the ones Ray builds
(Train V2's worker-group errors inside Tune's RayTaskError, pickled and read back as Tune
does), so no Ray cluster is started."""

from __future__ import annotations

import argparse
import csv
import traceback
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import torch
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.train.v2.api.exceptions import WorkerGroupError
from test_results import FakeResult

from distmed.cli import EXIT_USER_ERROR, run_entry_point
from distmed.errors import UserError
from distmed.failures import ANSI_ESCAPE, describe
from distmed.results import collect_rows, write_trials_csv

# The raylet's words for a memory-monitor kill (Ray 2.x), as OutOfMemoryError carries them.
MONITOR_TEXT = (
    "Task was killed due to the node running out of memory.\nMemory on the node (IP: "
    "10.0.0.5, ID: 8f2c) where the task (actor ID: 1a2b, name=RayTrainWorker.__init__, "
    "pid=4711, memory used=6.10GB) was running was 7.52GB / 7.77GB (0.968), which exceeds "
    "the memory usage threshold of 0.95. Ray killed this worker because it was the most "
    "recently scheduled task."
)
# What Ray says of any worker that died without a known cause: OOM only as a possibility.
UNEXPLAINED_DEATH = (
    "A worker died or was killed while executing a task by an unexpected system error. "
    "Some common causes include: (1) the process was killed by the OOM killer due to high "
    "memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly."
)


def _worker_group_error(failure: BaseException, health_check: bool) -> WorkerGroupError:
    """`trainer.fit()`'s error: the worker's own exception, or (a dead worker) the failed
    health check around the error `ray.get` raised for it (worker_group.py, poll.py)."""
    if health_check:
        failure = WorkerHealthCheckFailedError(
            "A worker health check failed.\nWorker info: Worker(rank=0, pid=4711)", failure
        )
    return WorkerGroupError(f"[Rank 0]\n{failure}", {0: failure})


def _through_tune(cause: BaseException) -> BaseException:
    """What a ResultGrid's `error` holds when the trial function raised `cause`: the
    RayTaskError that `ray.get` raised (an instance of the cause's class too), pickled into
    the trial's error.pkl by Tune and read back."""
    try:
        raise cause
    except type(cause):
        trace = traceback.format_exc()
    error = RayTaskError(
        "train", trace, cause, proctitle="ray::ImplicitFunc.train()", pid=4242, ip="10.0.0.5"
    ).as_instanceof_cause()
    return cloudpickle.loads(cloudpickle.dumps(error))


def _actor_died(text: str) -> ActorDiedError:
    return ActorDiedError(
        ActorDiedErrorContext(
            error_message=text, actor_id=bytes(16), class_name="RayTrainWorker", pid=4711
        )
    )


TRIAL_ERRORS = {
    "memory monitor killed a worker": (
        _through_tune(_worker_group_error(OutOfMemoryError(MONITOR_TEXT), health_check=True)),
        "out of memory",
    ),
    "memory monitor killed the trial's own actor (text only)": (
        f"Failure # 1 (occurred at 2026-12-05_04-12-00)\n{MONITOR_TEXT}\n",
        "out of memory",
    ),
    "memory monitor text on a dead actor": (
        _through_tune(
            _worker_group_error(
                _actor_died("1 worker(s) were killed due to memory pressure (OOM)"), True
            )
        ),
        "out of memory",
    ),
    "CUDA out of memory in a worker": (
        _through_tune(_worker_group_error(torch.OutOfMemoryError("CUDA out of memory"), False)),
        "out of GPU memory",
    ),
}


@pytest.mark.parametrize("case", list(TRIAL_ERRORS), ids=list(TRIAL_ERRORS))
def test_an_out_of_memory_trial_says_so_and_what_to_lower(case: str, tmp_path: Path):
    error, expected = TRIAL_ERRORS[case]
    rows = collect_rows([FakeResult({"trial_id": "t1"}, {"train.batch_size": 64}, error)], [])
    write_trials_csv(tmp_path / "trials.csv", rows, [])
    with (tmp_path / "trials.csv").open(newline="") as handle:
        cell = next(csv.DictReader(handle))["error"]
    assert rows[0].status == "errored"
    assert cell.startswith(expected), cell
    for lever in ("train.batch_size", "data.image_size", "--max-concurrent"):
        assert lever in cell
    assert "RayTaskError" not in cell and "ray::" not in cell and "\n" not in cell


def test_a_user_error_in_a_worker_is_its_own_message_not_rays_wrapper():
    message = "data.root /data/x.npz: labels must be 0..1, found -1 in 3 rows"
    error = _through_tune(_worker_group_error(UserError(message), health_check=False))
    assert ANSI_ESCAPE.sub("", str(error)).startswith("ray::ImplicitFunc.train()")  # wrapper
    assert describe(error) == message


def test_a_user_error_the_trial_raised_itself_is_its_own_message(tmp_path: Path):
    """`RayTaskError(UserError): ray::ImplicitFunc.train() (pid=...)` was the whole cell."""
    message = "Ray Train could not start 2 worker(s) of 1 CPU each within 180 s, 3 times: ..."
    error = _through_tune(UserError(message))
    assert type(error).__name__ == "RayTaskError(UserError)"
    rows = collect_rows([FakeResult({"trial_id": "t1"}, {}, error)], [])
    assert rows[0].error == message


def test_any_other_error_is_the_innermost_exception_and_its_first_line():
    error = _through_tune(_worker_group_error(ValueError("bad shape\nmore detail"), False))
    assert describe(error) == "ValueError: bad shape"
    text = "Failure # 1 (occurred at x)\nTraceback ...\n  File 'y'\nKeyError: 'fold3'\n"
    assert describe(text) == "KeyError: 'fold3'"


def test_a_worker_death_with_no_known_cause_is_not_called_out_of_memory():
    error = _through_tune(_worker_group_error(_actor_died(UNEXPLAINED_DEATH), True))
    line = describe(error)
    assert "out of memory" not in line
    # Ray could not pickle the dead actor's error; only its text came back.
    assert line.startswith("RayError: Exception ray.train.WorkerGroupError isn't serializable")


def test_the_cli_line_for_a_memory_monitor_kill_is_one_user_error_line(capsys):
    """`distmed.train`'s fit raises the worker-group error itself (no Tune around it)."""

    def body(args: argparse.Namespace) -> int:
        raise _worker_group_error(OutOfMemoryError(MONITOR_TEXT), health_check=True)

    code = run_entry_point(body, argparse.Namespace(debug=False))
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert err.startswith("error: out of memory: Ray's memory monitor") and err.count("\n") == 1
    assert "--max-concurrent" in err and "WorkerGroupError" not in err


class _ErroredTrial:
    """The part of a Tune Trial that EpochLines reads once Tune has saved its error."""

    trial_id = "t1"
    # Tune's own pointer: the driver's staging copy, in the Ray session folder that is
    # removed when the command ends.
    error_file = "/tmp/ray/session_1/artifacts/driver_artifacts/exp/run_t1/error.txt"
    run_metadata = SimpleNamespace(error_filename="error.txt")
    storage = SimpleNamespace(trial_dir_name="run_t1")

    def get_pickled_error(self):
        return None  # OutOfMemoryError is no RayTaskError: Tune keeps only its text

    def get_error(self):
        return f"Failure # 1 (occurred at 2026-12-05_04-12-00)\n{MONITOR_TEXT}\n"


@pytest.mark.parametrize("experiment", ["/results/exp", "s3://bucket/runs/exp/"])
def test_the_console_line_of_an_errored_trial_names_the_cause_and_the_kept_file(capsys, experiment):
    """The line points at the copy in the search's storage, which outlives the command."""
    from distmed.search import EpochLines

    EpochLines(experiment).on_trial_error(0, [], _ErroredTrial())
    err = capsys.readouterr().err
    assert err.startswith("  trial t1 errored: out of memory: Ray's memory monitor killed")
    kept = f"{experiment.rstrip('/')}/run_t1/error.txt"
    assert err.rstrip().endswith(f"(details: {kept})")


def test_a_worker_s_user_error_ends_the_fit_instead_of_being_retried():
    """Ray Train retried a worker group that failed on bad input (a streamed file that cannot
    be decoded) `scaling.max_failures` times, each attempt failing the same way; the fit's
    callback raises the UserError, which Ray Train's failure policy does not retry (measured
    by hand: one worker-group start instead of three with max_failures 2)."""
    from distmed.fitcallbacks import StopOnUserError

    callback = StopOnUserError()
    callback.after_exception(None, {0: RuntimeError("a worker crashed"), 1: OSError("reset")})
    wrapped = RuntimeError("ray::RayTrainWorker.run() failed")
    wrapped.__cause__ = UserError("data.loader stream: cannot decode a/p00.png (truncated)")
    with pytest.raises(UserError, match="cannot decode a/p00.png") as raised:
        callback.after_exception(None, {0: RuntimeError("peer gone"), 1: wrapped})
    assert raised.value is wrapped.__cause__  # the user's error itself, not Ray's wrapper
