"""`distmed <command>` (and `python -m distmed <command>`): one command in front of the others.

Owns only the dispatch: `distmed tune ...` runs `distmed.tune.main([...])`, exactly what
`distmed-tune ...` and `python -m distmed.tune ...` run, so each command keeps its one parser
and its one help text (`distmed tune --help`). The command's module is imported only when
it is named: `distmed --version` and `distmed --help` load no torch and no Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from distmed import version
from distmed.cli import BadCommandLine, invoked_as, parse
from distmed.errors import EXIT_USER_ERROR

# command -> (the front door whose `main(argv)` it runs, its line in `distmed --help`).
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("distmed.data.__main__", "inspect a data source: classes, splits, patients"),
    "train": ("distmed.train", "cross-validate one configuration"),
    "tune": ("distmed.tune", "search hyperparameters (Ray Tune), refit, test, report"),
    "evaluate": ("distmed.evaluate", "score a saved model on another site's labelled images"),
    "predict": ("distmed.predict", "predict image files or folders with a saved model"),
    "report": ("distmed.report", "rewrite a finished search's report.html"),
    "export": ("distmed.export", "export a saved model to TorchScript or ONNX"),
    "app": ("distmed.app", "a local web page that predicts uploaded images"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="distmed",
        description="Cross-validated, Ray-distributed fine-tuning of torchvision models on "
        "medical images. Not for clinical use.",
        epilog=f"commands (each has its own --help, e.g. distmed tune --help):\n{listing}\n\n"
        "examples:\n  distmed tune --space demo\n  distmed data ~/data/chest_xray\n"
        "  distmed predict --model runs/demo-1/best_model.pt ~/new_images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"distmed {version()}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="see below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `argv[0]`'s command with the rest of `argv`; returns its exit status.

    No command, or one not in COMMANDS, is one `error:` line and status 2 (`--help` lists
    them); `--help` and `--version` exit 0 through argparse.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[args[0]][0])
        with invoked_as(f"distmed {args[0]}"):  # its usage line says `distmed tune`
            return int(module.main(args[1:]))
    try:
        parse(build_parser(), args)  # --help, --version, or a one-line error
    except BadCommandLine:
        return EXIT_USER_ERROR
    return EXIT_USER_ERROR  # not reached: a known command was dispatched above


if __name__ == "__main__":
    sys.exit(main())
