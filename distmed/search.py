"""The search: a Ray Tune `Tuner` whose trials are k-fold CV runs, sampled by Optuna's TPE.

Each Tune trial is a small driver function that fits one `TorchTrainer` over all folds
(Train V2's pattern; `Tuner(trainer)` is deprecated). Workers report the fold-averaged
validation ROC-AUC every epoch, which is what ASHA compares. A trial that ASHA stops is told
to Optuna as PRUNED (TPE then ranks it by its last intermediate value, below every complete
trial) rather than as COMPLETE with a score from fewer epochs than the others had.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TextIO, cast

import optuna
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from distmed import _ray_compat
from distmed.artifacts import delete_checkpoints
from distmed.config import ExperimentConfig
from distmed.cv import FoldPlan, cross_validate
from distmed.failures import describe
from distmed.fitcallbacks import ReportToTune, format_epoch
from distmed.pareto import ModelSize
from distmed.resources import TRIAL_CPU, WorkerLayout
from distmed.results import completed_score
from distmed.space import (
    OBJECTIVE_MODES,
    SearchSettings,
    SearchSpaceFile,
    apply_params,
    to_tune_domains,
)
from distmed.tunestate import RecordTuneState, check_state, remember_tuner_file
from distmed.uris import shown

if TYPE_CHECKING:
    from distmed.warmstart import WarmStart

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled parameters (shipped once per search)."""

    base: dict[str, Any]
    plan: FoldPlan
    layout: WorkerLayout
    train_storage: str
    report_num_params: bool = False  # two objectives: every report carries the model size


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: the base config with `params` applied, cross-validated by Ray Train."""
    cfg = apply_params(ExperimentConfig.model_validate(context.base), params)
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = trial_run_name(trial_id)
    extra = {}
    if context.report_num_params:
        extra["num_params"] = ModelSize(context.base, context.plan.task.num_outputs)(params)
    to_tune = ReportToTune(extra)
    cross_validate(
        cfg,
        context.plan,
        context.layout,
        context.train_storage,
        run_name=run_name,
        callbacks=[to_tune],
        detail_uri=f"{context.train_storage}/{run_name}",  # histories for the report
    )
    wait_until_tune_took_every_report(to_tune)


def wait_until_tune_took_every_report(
    to_tune: TuneReportCallback, timeout_s: float = 60.0, settle_s: float = 0.5
) -> None:
    """Return only once the trial's main thread has taken the last epoch report from Train.

    Ray 2.60 race (a CI run hung on it): the callback hands reports to the trial through a
    queue that the trial's main thread empties only when Tune asks for its next result. Were
    this function to return first, Tune's end-of-trial marker would take the trial's one-slot
    result queue, and the main thread, forwarding the last report after it, would wait on that
    slot forever. The queue is the callback's own (no public handle); a Ray without it is an
    error (`_ray_compat.pending_reports`), not a skipped wait. A trial Tune stops meanwhile is
    ended by Tune, so the wait is bounded.
    """
    reports = _ray_compat.pending_reports(to_tune)
    deadline = time.monotonic() + timeout_s
    while not reports.empty():
        if time.monotonic() > deadline:
            log.warning("Tune has not taken the last report after %.0f s; ending anyway", timeout_s)
            return
        time.sleep(0.1)
    # Taken off the queue, the report reaches the result slot within milliseconds.
    time.sleep(settle_s)


class CVOptunaSearch(OptunaSearch):
    """OptunaSearch that reports scheduler-stopped trials to Optuna as PRUNED, and adds an
    earlier search's trials to the study before the first is sampled (`warm`: parameters
    and objective values, one per metric)."""

    def __init__(
        self,
        *args: Any,
        warm: tuple[list[dict[str, Any]], list[list[float]]] = ([], []),
        **kwargs: Any,
    ) -> None:
        self._warm = warm
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        self.add_warm_trials()

    def add_warm_trials(self) -> None:
        """The warm trials as COMPLETE trials of the study (once: a restored study has them)."""
        if self._ot_study is None or self._ot_study.trials:
            return
        one = isinstance(self._metric, str)
        for params, values in zip(*self._warm, strict=True):
            try:
                self._ot_study.add_trial(
                    optuna.trial.create_trial(
                        params=params,
                        distributions={k: self._space[k] for k in params},
                        **({"value": values[0]} if one else {"values": values}),
                    )
                )
            except (ValueError, KeyError) as exc:  # warmstart checked them against the space
                log.warning("warm-start trial left out: %s", exc)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            score = result.get(metrics[0])
            if not result.get("cv_complete") or score is None or not math.isfinite(score):
                # No values makes OptunaSearch tell PRUNED (see its on_trial_complete).
                result = (
                    None
                    if len(metrics) > 1
                    else {k: v for k, v in result.items() if k != self.metric}
                )
        super().on_trial_complete(trial_id, result, error)


class EpochLines(ray.tune.Callback):
    """One line per trial per epoch, and one when a trial ends (stdout, driver side).

    `experiment`: the search's folder (or URI) in its storage, where an errored trial's
    error file outlives the run (Tune's `trial.error_file` is the driver's staging copy,
    inside the Ray session folder removed when the command ends).
    """

    def __init__(self, experiment: str = "") -> None:
        self.experiment = experiment

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune times each report itself: the seconds since the trial's previous one.
        line = format_epoch(result, seconds=result.get("time_this_iter_s"))
        print(f"  trial {trial.trial_id} {line}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        state = "completed" if last.get("cv_complete") else "stopped early"
        auc = last.get("cv_roc_auc", float("nan"))
        print(f"  trial {trial.trial_id} {state}: CV ROC-AUC {auc:.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        where = self._kept_error_file(trial) or "trials.csv"
        print(
            f"  trial {trial.trial_id} errored: {trial_error_line(trial)} (details: {where})",
            file=sys.stderr,
            flush=True,
        )

    def _kept_error_file(self, trial) -> str | None:
        name, folder = trial.run_metadata.error_filename, trial.storage.trial_dir_name
        if not (self.experiment and name and folder):
            return None
        return shown(f"{self.experiment.rstrip('/')}/{folder}/{name}")


def trial_error_line(trial) -> str:
    """Why `trial` errored, in one line (`failures.describe`), from the error Tune saved."""
    try:  # read back from the trial's storage, where Tune has just written it
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - a storage hiccup must not end the search
        error = None
    return describe(error) if error else "see the error file"


class EndedTrials(ray.tune.Callback):
    """Records which trials ended (finished, stopped by the scheduler, errored) in this process.

    When a Ctrl-C ends the search, Tune stops the other trials too and marks them TERMINATED
    like the rest; they are the ones not recorded here. A resumed search unpickles its
    callbacks from the saved experiment, so the record lives on the class, per process.
    """

    ended: ClassVar[set[str]] = set()

    def on_trial_complete(self, iteration, trials, trial, **info):
        EndedTrials.ended.add(trial.trial_id)

    on_trial_error = on_trial_complete


class StopOnCtrlC:
    """Ctrl-C during `Tuner.fit()`: the first stops the search, a second exits at once.

    The first Ctrl-C asks Tune to stop the way its own handler would (SIGUSR1: Tune saves
    the experiment state, then stops the trials) and sets `interrupted`, which Tune's
    handler would not tell anyone. The second prints `on_exit` and ends the process with
    status 130 without waiting for anything (the Ray instance's reaper stops its processes).
    """

    def __init__(self, on_exit: str) -> None:
        self.on_exit = on_exit
        self.interrupted = False
        self._previous: Any = None

    def __enter__(self) -> StopOnCtrlC:
        os.environ[_ray_compat.TUNE_DISABLE_SIGINT_HANDLER] = "1"  # ours instead, installed here
        # Tune's own hint names its Python API (Tuner.restore); we print the CLI command.
        logging.getLogger("ray.tune.tune").addFilter(_drop_restore_hint)
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.interrupted:
            print(f"\ninterrupted again: exiting now. {self.on_exit}", file=sys.stderr, flush=True)
            os._exit(130)
        self.interrupted = True
        print(
            "\nCtrl-C: stopping the search and saving its state (Ctrl-C again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        stop = _ray_compat.TUNE_STOP_SIGNAL
        if signal.getsignal(stop) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise KeyboardInterrupt  # Tune has not started (or has finished) its loop
        os.kill(os.getpid(), stop)  # Tune's own stop request (ray.tune.tune)


def _drop_restore_hint(record: logging.LogRecord) -> bool:
    return "Tuner.restore" not in record.getMessage()


# Tune's status block (every 30 s at verbose=1) prints Ray's logical CPU bookkeeping, e.g.
# "Logical resource usage: 0.01/2 CPUs": the trials' tiny driver reservations, which reads
# as an idle machine while the workers keep every core busy.
HIDDEN_STATUS_LINES = ("Logical resource usage:",)
PRINT_TRIAL_ERRORS = "TUNE_PRINT_ALL_TRIAL_ERRORS"


class DropLines:
    """A text stream passing everything to `stream` except lines that start with `prefixes`.

    Tune prints its status block with `print` and offers no setting for single lines of it
    (its new output engine ignores `progress_reporter`), so the lines are dropped on their
    way to stdout. An unfinished line is held back only while it could still become a
    hidden one; everything else goes through at once.
    """

    def __init__(self, stream: TextIO, prefixes: tuple[str, ...]) -> None:
        self.stream = stream
        self.prefixes = prefixes
        self._pending = ""  # the start of a line that may still turn out hidden
        self._mid_line = False  # the current line's start has gone through already
        # Prints may come from several threads; and a signal handler that prints runs on
        # the thread that may hold the lock already (hence re-entrant).
        self._lock = threading.RLock()

    def write(self, text: str) -> int:
        with self._lock:
            self.stream.write(self._filter(text))
        return len(text)

    def _filter(self, text: str) -> str:
        self._pending += text
        out = []
        while self._pending:
            head, newline, rest = self._pending.partition("\n")
            if self._mid_line or newline:
                if self._mid_line or not head.startswith(self.prefixes):
                    out.append(head + newline)
                self._pending, self._mid_line = rest, self._mid_line and not newline
            elif any(p.startswith(head) or head.startswith(p) for p in self.prefixes):
                break  # unfinished, and it may be (or is) a hidden line: wait for its end
            else:
                out.append(head)
                self._pending, self._mid_line = "", True
        return "".join(out)

    def release(self) -> None:
        """Write out a held, unfinished line unless it is a hidden one."""
        with self._lock:
            if self._pending and not self._pending.startswith(self.prefixes):
                self.stream.write(self._pending)
            self._pending = ""
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        # encoding, isatty, fileno, ...: whatever callers ask of stdout, from the real one.
        return getattr(self.stream, name)


@contextlib.contextmanager
def hidden_status_lines(hide: bool = True) -> Iterator[None]:
    """While open, stdout drops Tune's HIDDEN_STATUS_LINES and Tune logs no traceback for an
    errored trial (`hide=False`: shows all). The trial's error is one line from `EpochLines`
    naming Tune's error file, and its first line is in trials.csv."""
    if not hide:
        yield
        return
    previous = sys.stdout
    filtered = DropLines(previous, HIDDEN_STATUS_LINES)
    sys.stdout = cast(TextIO, filtered)
    # Read when Tune's controller starts (inside Tuner.fit); Ray's own switch for the
    # "Trial task failed" log record with its 60-line traceback.
    errors_before = os.environ.get(PRINT_TRIAL_ERRORS)
    os.environ[PRINT_TRIAL_ERRORS] = "0"
    try:
        yield
    finally:
        sys.stdout = previous
        filtered.release()
        if errors_before is None:
            os.environ.pop(PRINT_TRIAL_ERRORS, None)
        else:
            os.environ[PRINT_TRIAL_ERRORS] = errors_before


class KeepBestCheckpoints(ray.tune.Callback):
    """Delete a trial's Train checkpoints once it has ended, unless it is the best so far.

    The best completed trial's last checkpoint holds its fold models, which `best_model.pt`
    keeps (weights only) for `--ensemble folds`; a trial that overtakes it frees the old
    best's. Decided from every trial's last report, so a resumed search needs no state.
    After the refit `distmed.tune` deletes what is left.
    """

    def __init__(self, train_storage: str) -> None:
        self.train_storage = train_storage
        self.deleted: set[str] = set()

    def on_trial_complete(self, iteration, trials, trial, **info):
        scores = {t.trial_id: completed_score(t.last_result) for t in trials}
        best = max((s for s in scores.values() if s is not None), default=None)
        ended = [t for t in trials if t.is_finished() or t is trial]
        for t in ended:
            score = scores[t.trial_id]
            if t.trial_id not in self.deleted and (score is None or best is None or score < best):
                self._delete(t.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._delete(trial.trial_id)

    def _delete(self, trial_id: str) -> None:
        delete_checkpoints(f"{self.train_storage}/{trial_run_name(trial_id)}")
        self.deleted.add(trial_id)


def startup_trials(num_samples: int) -> int:
    """TPE's random start-up for a budget of `num_samples` trials: a quarter, 3 to 10.

    Optuna's `TPESampler` samples at random until `n_startup_trials` trials have finished
    (default 10, its docs). With 10 of a 12-trial budget that is random search. TPE splits
    the finished trials into a good and a bad group (gamma: the best ~10%) and needs a few in
    each to model them, hence at least 3; at most Optuna's default 10, which large budgets keep.
    """
    return min(10, max(3, num_samples // 4))


def resolve_sampler(settings: SearchSettings, max_concurrent: int) -> dict[str, Any]:
    """`search.sampler` with `auto` decided: the values the sampler is built with.

    `constant_liar` (auto: on when `max_concurrent > 1`): Optuna's TPE otherwise ignores
    running trials, and trials started together draw from the same model, so near-duplicate
    configurations; the liar counts each running trial as a poor result (Optuna's docs
    recommend it for parallel trials). `algorithm: random` has none of these settings.
    """
    if settings.algorithm == "random":
        return {"algorithm": "random", "seed": settings.seed}
    s = settings.sampler
    startup = startup_trials(settings.num_samples)
    return {
        "algorithm": "tpe",
        "seed": settings.seed,
        "n_startup_trials": startup if s.n_startup_trials == "auto" else s.n_startup_trials,
        "constant_liar": max_concurrent > 1 if s.constant_liar == "auto" else s.constant_liar,
        "multivariate": s.multivariate,
        "group": s.group,
    }


def build_sampler(resolved: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler for `resolve_sampler`'s settings."""
    options = {k: v for k, v in resolved.items() if k != "algorithm"}
    if resolved["algorithm"] == "random":
        return optuna.samplers.RandomSampler(**options)
    with warnings.catch_warnings():
        # multivariate, group and constant_liar are marked experimental (their API may change)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(**options)


def trial_run_name(trial_id: str) -> str:
    """The Ray Train run of a trial, named from its id so a restored trial finds it."""
    return f"cv-{trial_id}"


def build_tuner(
    spec: SearchSpaceFile,
    context: TrialContext,
    name: str,
    storage: str,
    max_concurrent: int,
    callbacks: list[Any],
    verbose: bool,
    warm: WarmStart | None = None,
) -> ray.tune.Tuner:
    """A Tuner over `spec.space`: a seeded Optuna sampler (`resolve_sampler`; `warm`: an
    earlier search's trials in its study first), a concurrency cap, ASHA (or FIFO)."""
    settings = spec.search
    sampler = build_sampler(resolve_sampler(settings, max_concurrent))
    warm_trials = (warm.params, warm.values) if warm else ([], [])
    if settings.multi_objective:
        # Tune's TuneConfig takes one metric and would overwrite the searcher's list, so the
        # searcher gets the space and both objectives itself (Ray's multi-objective pattern).
        searcher = CVOptunaSearch(
            space=OptunaSearch.convert_search_space(to_tune_domains(spec.space)),
            metric=list(settings.objectives),
            mode=[OBJECTIVE_MODES[o] for o in settings.objectives],
            sampler=sampler,
            warm=warm_trials,
        )
        param_space: dict[str, Any] = {}
    else:
        searcher = CVOptunaSearch(sampler=sampler, warm=warm_trials)
        param_space = to_tune_domains(spec.space)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_CPU}
        ),
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
            scheduler=build_scheduler(spec),
            num_samples=settings.num_samples,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[
                EpochLines(experiment_path(storage, name)),
                EndedTrials(),
                KeepBestCheckpoints(context.train_storage),
                RecordTuneState(experiment_path(storage, name)),  # for --resume's check
                *callbacks,
            ],
            verbose=2 if verbose else 1,
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )
    remember_tuner_file(experiment_path(storage, name))  # written by Tuner() just now
    return tuner


def build_scheduler(spec: SearchSpaceFile):
    """ASHA on the fold-averaged ROC-AUC, one rung per epoch; `none` runs every trial fully."""
    sched = spec.search.scheduler
    if sched.type == "none":
        return FIFOScheduler()
    warn_of_scheduler(spec)
    return ASHAScheduler(
        time_attr="training_iteration",  # one Tune iteration per epoch report
        max_t=max_epochs(spec),
        grace_period=min(sched.grace_period, max_epochs(spec)),
        reduction_factor=sched.reduction_factor,
    )


def warn_of_scheduler(spec: SearchSpaceFile) -> list[str]:
    """ASHA settings under which its stops mean little or nothing, said before the search
    (and by --dry-run): `warn_of_rungs_in_warmup`, `warn_of_no_rung`."""
    if spec.search.scheduler.type == "none":
        return []
    said = (warn_of_rungs_in_warmup(spec), warn_of_no_rung(spec))
    return [message for message in said if message]


def warn_of_no_rung(spec: SearchSpaceFile) -> str | None:
    """Say (log, and return) when ASHA's grace period is not under the trials' epochs: its
    first rung is then the last epoch, so it stops no trial and every trial runs in full."""
    grace, epochs = spec.search.scheduler.grace_period, max_epochs(spec)
    if grace < epochs:
        return None
    lower = f"set grace_period to at most {epochs - 1}, or " if epochs > 1 else ""
    message = (
        f"search.scheduler.grace_period {grace} is not under train.epochs {epochs}: ASHA can "
        f"stop no trial, so every trial runs all its epochs; {lower}set "
        "search.scheduler.type: none (no early stopping)"
    )
    log.warning(message)
    return message


def warn_of_rungs_in_warmup(spec: SearchSpaceFile) -> str | None:
    """Say (log, and return) when ASHA's first rung falls within the learning-rate warm-up:
    trials are then stopped on scores taken while their rate still ramps up, which ranks
    them by how fast they warm up (benchmarks/BENCHMARKS.md part 8: the search benchmark's
    grace period 1 with a 1-epoch warm-up)."""
    warmup = int(max(spec.drawn("optim.warmup_epochs", spec.base.optim.warmup_epochs)))
    grace = min(spec.search.scheduler.grace_period, max_epochs(spec))
    if warmup == 0 or grace > warmup or grace >= max_epochs(spec):
        return None
    message = (
        f"search.scheduler.grace_period {grace} is within optim.warmup_epochs {warmup}: ASHA "
        "will stop trials on scores taken while their learning rate still warms up; set "
        f"grace_period to {warmup + 1} or more"
    )
    log.warning(message)
    return message


def max_epochs(spec: SearchSpaceFile) -> int:
    """The most epochs any trial can run (the space may search `train.epochs` itself)."""
    return int(max(spec.drawn("train.epochs", spec.base.train.epochs)))


def restore_tuner(path: str, context: TrialContext) -> ray.tune.Tuner:
    """Continue an interrupted search: finished trials are kept, unfinished ones resume.

    Raises:
        UserError: the state there is not what this machine recorded Tune writing for it
            (`tunestate.check_state`): restoring unpickles it.
    """
    check_state(path)
    return ray.tune.Tuner.restore(
        path,
        trainable=ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_CPU}
        ),
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
    )


def can_restore(uri: str) -> bool:
    """Whether Tune has a search to continue at `uri` (its tuner.pkl is there)."""
    return bool(ray.tune.Tuner.can_restore(uri))


def experiment_path(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)
