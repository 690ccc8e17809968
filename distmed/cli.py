"""What every entry point shares: common options, `--model` checking, the device, logging
set-up, one-line user errors.

A `UserError` (or a training failure caused by one) is printed as a single `error:` line
and the process exits with status 2; `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distmed.config import DataConfig
from distmed.data.index import DataIndex
from distmed.data.inspection import check_duplicates, format_summary, inspect_index
from distmed.errors import UserError
from distmed.uris import check_arguments

if TYPE_CHECKING:
    import torch

EXIT_USER_ERROR = 2


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`; `example` ends its help."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one config value, validated like the file (repeatable), e.g. {example}",
    )


def add_common_options(parser: argparse.ArgumentParser) -> None:
    add_set_option(parser, "--set train.epochs=3 --set optim.lr=3e-4")
    parser.add_argument(
        "--data",
        help="data source: image folder, labels .csv, MedMNIST .npz, medmnist:NAME or demo",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="train on CPU even when GPUs are visible"
    )
    parser.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks) per run, e.g. 2")
    add_debug_option(parser)


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """`--model` and `--ensemble`: which saved model, and which of its networks predicts."""
    parser.add_argument("--model", required=True, help="best_model.pt written by distmed.tune")
    parser.add_argument(
        "--ensemble",
        choices=("refit", "folds"),  # distmed.inference.ENSEMBLES (imports torch models)
        default="refit",
        help="refit: the model refitted on all training data (default); folds: the best "
        "trial's k fold models, their probabilities averaged",
    )


def add_threshold_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        type=float,
        help="binary tasks: positive-class threshold (default: the one saved in the model)",
    )


def checked_threshold(value: float | None, binary: bool) -> float | None:
    """`--threshold` as given (None when not), checked for the model it applies to.

    Raises:
        UserError: given for a multi-class model, or not a probability in [0, 1].
    """
    if value is None:
        return None
    if not binary:
        raise UserError("--threshold applies to binary models only")
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise UserError(f"--threshold {value}: a probability in [0, 1], e.g. 0.5")
    return value


def model_path(args: argparse.Namespace) -> Path:
    """The `--model` file, checked to exist.

    Raises:
        UserError: there is no such file.
    """
    path = Path(args.model)
    if not path.is_file():
        raise UserError(f"--model {path}: no such file (a best_model.pt from distmed.tune)")
    return path


def choose_device(cpu: bool = False) -> torch.device:
    """The first CUDA GPU when there is one (and `cpu` is not asked for), else the CPU."""
    import torch  # here: the data inspector and --help need no torch

    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The shortcut flags, as `--set` overrides, ahead of the user's own `--set` items."""
    items = []
    if args.data:
        items.append(f"data.root={args.data}")
    if args.workers is not None:
        items.append(f"scaling.num_workers={args.workers}")
    if args.cpu:
        items.append("scaling.use_gpu=false")
    return items + list(args.overrides)


def run_entry_point(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run `body(args)`, turning user errors into one line on stderr and exit status 2."""
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("ray", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_arguments(args)  # no secret in a URI reaches a log, a result or Ray
        return body(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        results = getattr(args, "output", None) or getattr(args, "storage", None)
        if results and "://" not in str(results):
            results = str(Path(results).resolve())
        cause = user_error_cause(exc, results)
        if cause is None:
            # Ray's "Training failed due to worker errors:" names no cause; the worker's does.
            root = worker_failure(exc) or exc
            print(
                f"error: {type(root).__name__}: {first_line(root)} "
                "(rerun with --debug for details)",
                file=sys.stderr,
            )
            return 1
        print(f"error: {cause}", file=sys.stderr)
        return EXIT_USER_ERROR


def inspect_data(index: DataIndex, cfg: DataConfig) -> dict[str, Any]:
    """Print the short data summary (and a duplicate warning); the full one for results.

    Raises:
        UserError: duplicates across splits or classes with `data.on_duplicates: error`.
    """
    inspection = inspect_index(index, cfg)
    print(format_summary(inspection, short=True), flush=True)
    warning = check_duplicates(inspection, cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return inspection


def user_error_cause(exc: BaseException, disk_hint: str | None = None) -> UserError | None:
    """The `UserError` behind `exc`, also when Ray wrapped it on its way from a worker.

    A full disk anywhere in the chain (ENOSPC: --output, --storage, the cache, /tmp) is the
    user's to fix too: one line naming the file that could not be written, or `disk_hint`
    (the run's results folder) where the error names none (pyarrow's, Ray's storage).
    """
    chain = list(_exception_chain(exc))
    for current in chain:
        if isinstance(current, UserError):
            return current
    for current in chain:
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            where = current.filename or disk_hint or "a results or cache folder"
            return UserError(
                f"no space left on the device holding {where}; free space there, or point "
                "--output / --storage / data.cache_dir at a disk with room, then run again "
                "(a search: add --resume)"
            )
    return None


def worker_failure(exc: BaseException) -> BaseException | None:
    """The first Train worker's own exception inside Ray's wrappers, if any."""
    for current in _exception_chain(exc):
        failures = list(getattr(current, "worker_failures", {}).values())
        if failures:
            return failures[0]
    return None


def _exception_chain(exc: BaseException):
    """`exc`, its causes and contexts, and the worker / controller exceptions Ray keeps."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        # Ray Train's WorkerGroupError / ControllerError keep the workers' exceptions here.
        stack.extend(getattr(current, "worker_failures", {}).values())
        controller_failure = getattr(current, "controller_failure", None)
        if isinstance(controller_failure, BaseException):
            stack.append(controller_failure)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    return parser.parse_args(list(argv) if argv is not None else None)
