"""What every entry point shares: common options, `--model` checking, logging set-up,
one-line user errors.

A `UserError` (or a training failure caused by one) is printed as a single `error:` line
and the process exits with status 2; `--debug` shows the full traceback instead. A bad
command line is one such line too (`parse`), checked before any work: every numeric option
has a range (`bounded`), every text option a length, every path option a component length.
Front doors import torch, Ray and the library inside the functions that run after parsing,
so `--help` and a bad command line answer at once (tests/test_front_help.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import NoReturn

from distmed.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    MAX_NAME_BYTES,
    MAX_TEXT_BYTES,
    UserError,
    first_line,
    shorten,
)
from distmed.failures import root_cause, user_error_cause
from distmed.uris import check_arguments

# Text options longer than errors.MAX_TEXT_BYTES (or with a part over MAX_NAME_BYTES) fail
# deep inside (`OSError: File name too long`, echoing the whole value), so they are refused
# while parsing, each in one short line.
# Options (argparse dests) whose values are files, folders or URIs: each `/`-separated part
# becomes a file or folder name.
PATH_OPTIONS = frozenset(
    {"data", "space", "config", "output", "storage", "model", "gradcam", "json", "run_dir",
     "inputs", "root"}
)  # fmt: skip
# `--name`: a folder under --storage, which Ray Tune names files inside after it; kept well
# below NAME_MAX so those longer names fit too.
MAX_RUN_NAME_CHARS = 120
# The most bootstrap resamples a command accepts (`--bootstrap`): an (resamples, N) index
# array is drawn, 80 MB per 1000 images at this bound; beyond some thousands the percentiles
# of a 95% interval move less than their rounding (Efron & Tibshirani 1993, ch. 13).
MAX_RESAMPLES = 10_000


def bounded(kind: type[int] | type[float], low: float, high: float, example: str):
    """An argparse `type` accepting a finite `kind` in [low, high], refusing with the range.

    The refusal names the allowed range and an example (argparse prefixes the option's
    name); the value is quoted cut short (`errors.shorten`).
    """

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= high:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"{shorten(text)}: use {what} from {low:g} to {high:g}, e.g. {example}"
            )
        return value

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


def positive_fraction(text: str) -> float:
    """An argparse `type`: a number in (0, 1] (a rate such as a target sensitivity)."""
    value = bounded(float, 0.0, 1.0, "0.95")(text)
    if value == 0:
        raise argparse.ArgumentTypeError(
            f"{shorten(text)}: use a number above 0 up to 1, e.g. 0.95"
        )
    return value


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
    parser.add_argument(
        "--workers",
        type=bounded(int, 1, 1024, "2"),
        help="Ray Train workers (DDP ranks) per run, 1 to 1024, e.g. 2",
    )
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
        type=bounded(float, 0.0, 1.0, "0.5"),
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
    except KeyboardInterrupt as exc:  # its message, if any, says what is saved
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        results = getattr(args, "output", None) or getattr(args, "storage", None)
        if results and "://" not in str(results):
            results = str(Path(results).resolve())
        cause = user_error_cause(exc, results)
        if cause is None:
            # Ray's "Training failed due to worker errors:" names no cause; the worker's does.
            root = root_cause(exc)
            print(
                f"error: {type(root).__name__}: {first_line(root)} "
                "(rerun with --debug for details)",
                file=sys.stderr,
            )
            return 1
        print(f"error: {cause}", file=sys.stderr)
        return EXIT_USER_ERROR


class BadCommandLine(SystemExit):
    """A refused command line, already said in one line: exit status 2 (`parse`)."""

    def __init__(self) -> None:
        super().__init__(EXIT_USER_ERROR)


def run_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[argparse.Namespace], int],
) -> int:
    """A CLI's `main`: `parse` the command line, then `run_entry_point(body, args)`.

    A bad command line returns 2 (its one line printed) before any work; `args.argv` holds
    the arguments as given (a search's `--resume` hint repeats them); `args.locks` is an
    ExitStack whose contexts `body` enters (a results folder's lock, `distmed.runlock`) and
    which are released when the command ends, its error line printed.
    """
    try:
        args = parse(parser, argv)
    except BadCommandLine:
        return EXIT_USER_ERROR
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    with contextlib.ExitStack() as args.locks:
        return run_entry_point(body, args)


def resume_command(module: str, argv: list[str], name: str) -> str:
    """The command that continues a search: `python -m module` with the same arguments,
    `--name` and `--resume`."""
    args = list(argv)
    if "--name" not in args and not any(a.startswith("--name=") for a in args):
        args += ["--name", name]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([sys.executable, "-m", module, *args])


# The name the user typed for the running command (`distmed tune`), set by the `distmed`
# dispatcher for the command it runs; a ContextVar so it never outlives that call.
_INVOKED_AS: ContextVar[str | None] = ContextVar("distmed_invoked_as", default=None)


@contextlib.contextmanager
def invoked_as(prog: str) -> Iterator[None]:
    """Within the block, the command's usage, help and error lines say `prog`."""
    token = _INVOKED_AS.set(prog)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def command_name(default: str) -> str:
    """What the user typed to run this command, for its `usage:` line: `distmed tune` via the
    dispatcher (`invoked_as`), `distmed-tune` via that console script, else `default` (the
    parser's `python -m distmed.tune`). Why: a usage line is copied; it must be one that
    runs, in the form the user is already using."""
    if (typed := _INVOKED_AS.get()) is not None:
        return typed
    script = Path(sys.argv[0]).name if sys.argv else ""
    return script if script.startswith("distmed-") else default


def _rename(parser: argparse.ArgumentParser, prog: str) -> None:
    """`parser`'s usage line and the examples of its help (written with its default prog,
    `python -m distmed.tune --space demo`) say `prog` instead."""
    if prog == parser.prog:
        return
    for attr in ("description", "epilog"):
        if text := getattr(parser, attr):
            setattr(parser, attr, text.replace(parser.prog, prog))
    parser.prog = prog


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser`'s arguments from `argv` (default `sys.argv[1:]`), checked before any work.

    A bad command line is one `error:` line on stderr naming the option (argparse's usage
    text is left out; `--help` shows it) and exit status 2, as a `UserError` is: a value out
    of its option's range (`bounded`), a text option longer than MAX_TEXT_BYTES, a path
    option with a part longer than MAX_NAME_BYTES, a `--name` longer than
    MAX_RUN_NAME_CHARS. Values are quoted cut short (`errors.shorten`).
    """

    def one_line(message: str) -> NoReturn:
        print(f"error: {parser.prog}: {_short_message(message)}", file=sys.stderr)
        raise BadCommandLine

    _rename(parser, command_name(parser.prog))
    parser.error = one_line  # type: ignore[method-assign]
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        check_text_options(args)
    except UserError as exc:
        one_line(str(exc))
    return args


def check_text_options(args: argparse.Namespace) -> None:
    """Refuse text options too long for what they become (paths, folder names, keys).

    Raises:
        UserError: names the option, the length and the limit; the value cut short.
    """
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                _check_text(dest, text)


def _check_text(dest: str, text: str) -> None:
    option = dest if dest in ("inputs", "run_dir", "root") else "--" + dest.replace("_", "-")
    if dest == "overrides":
        option = "--set"
    size = len(text.encode(errors="surrogateescape"))
    if size > MAX_TEXT_BYTES:
        raise UserError(
            f"{option} {shorten(text)}: {size} bytes, longer than any path or value distmed "
            f"takes (at most {MAX_TEXT_BYTES}); check the command line"
        )
    if dest == "name" and (len(text) > MAX_RUN_NAME_CHARS or "/" in text or text in (".", "..")):
        raise UserError(
            f"--name {shorten(text)}: use a folder name (no '/') of at most "
            f"{MAX_RUN_NAME_CHARS} characters, e.g. --name xray-1"
        )
    if dest in PATH_OPTIONS:
        for part in text.split("/"):
            if len(part.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
                raise UserError(
                    f"{option} {shorten(text)}: the name {shorten(part)} is longer than a "
                    f"file system allows ({MAX_NAME_BYTES} bytes per file or folder name)"
                )


def _short_message(message: str) -> str:
    """argparse's message on one line, any long quoted value in it cut short."""
    message = " ".join(message.split())
    message = re.sub(r"'([^']{60,})'", lambda quoted: shorten(quoted.group(1)), message)
    return message if len(message) <= 300 else message[:300] + "…"
