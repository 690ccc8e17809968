"""`python -m distmed.report RUN_DIR`: (re)write a finished search's `report.html`.

The page itself is `distmed.runreport`'s (the search writes it when it ends); this front door
only rebuilds it, for instance with more bootstrap resamples. It reads and never writes the
model: the operating threshold it shows was chosen on out-of-fold predictions when the
search finished and saved in best_model.pt (`distmed.tune --target-sensitivity`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from distmed.cli import MAX_RESAMPLES, add_debug_option, bounded, run_command
from distmed.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.report",
        description="Write RUN_DIR/report.html (search, training curves, test split with "
        "bootstrap CIs, Grad-CAM) from a finished distmed.tune run.",
    )
    parser.add_argument("run_dir", help="a search's results folder, e.g. runs/demo")
    # Moved to distmed.tune (the threshold is chosen when the search ends, and this command
    # never writes the model): left out of --help, still taken so that an old command line
    # gets the one line saying where it went.
    parser.add_argument("--target-sensitivity", type=float, help=argparse.SUPPRESS)
    parser.add_argument(
        "--bootstrap",
        type=bounded(int, 10, MAX_RESAMPLES, "1000"),
        default=1000,
        help=f"bootstrap resamples for CIs, 10 to {MAX_RESAMPLES} (default 1000)",
    )
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    from distmed.runreport import build_report

    if args.target_sensitivity is not None:
        raise UserError(
            "--target-sensitivity: the operating threshold is chosen on out-of-fold "
            "predictions when the search ends and saved in best_model.pt; pass it to "
            "distmed.tune (the same command with --resume re-chooses it for a finished search)"
        )
    path = build_report(Path(args.run_dir), resamples=args.bootstrap)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
