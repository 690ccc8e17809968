"""`python -m distmed.data ROOT [--json FILE]`: inspect a data source before training.

ROOT may also be given as `--data ROOT`, as training takes it and as distmed's messages say.

Prints what distmed will use (layout, splits, classes and counts, formats, skipped files,
patients, duplicates) without training or starting Ray; `--json` writes the same as a file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from distmed.artifacts import write_json_atomic
from distmed.cli import (
    add_debug_option,
    add_set_option,
    run_command,
)
from distmed.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.data",
        description="Inspect a data source (image folder, labels .csv, MedMNIST .npz, "
        "medmnist:NAME, demo) without training: layout, classes and counts per split, "
        "formats, skipped files, "
        "patients and duplicates.",
        epilog="example: python -m distmed.data ~/data/chest_xray --json chest_xray.json",
    )
    parser.add_argument("root", nargs="?", help="the data source, as given to --data")
    parser.add_argument("--data", help="the same as ROOT (the option train and tune take)")
    parser.add_argument("--json", help="also write the full summary to this JSON file")
    parser.add_argument(
        "--config", help="experiment YAML: its data section (groups, cache_dir) applies"
    )
    add_set_option(parser, "--set data.group_regex='^(p\\d+)_'")
    add_debug_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)


def _run(args: argparse.Namespace) -> int:
    from distmed.config import load_config
    from distmed.data.inspection import duplicate_problem, format_summary, inspect_index
    from distmed.data.sources import scan_source

    cfg = load_config(args.config, [*args.overrides, f"data.root={_root(args)}"]).data
    summary = inspect_index(scan_source(cfg), cfg)
    print(format_summary(summary))
    problem = duplicate_problem(summary)
    if problem:
        print(f"warning: {problem}")
    if args.json:
        write_json_atomic(Path(args.json), summary)
        print(f"-> {args.json}")
    return 0


def _root(args: argparse.Namespace) -> str:
    """ROOT or `--data ROOT`: messages advise `--data` (train's option), so both are taken."""
    if args.root and args.data and args.root != args.data:
        raise UserError(f"two data sources, {args.root} and --data {args.data}; give one")
    root = args.root or args.data
    if not root:
        raise UserError("no data source: python -m distmed.data ROOT (or --data ROOT)")
    return root


if __name__ == "__main__":
    sys.exit(main())
