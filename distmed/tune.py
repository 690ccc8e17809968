"""`python -m distmed.tune --space FILE`: the hyperparameter search over CV ROC-AUC.

The front door: argv -> a search-space file and a `pipeline.RunContext` -> the stages of
`distmed.pipeline` in order (prepare -> Ray -> search -> finalize -> summary, report,
publish; nested CV through `distmed.nested`) -> what is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from distmed.cli import (
    add_common_options,
    bounded,
    overrides_from_args,
    positive_fraction,
    resume_command,
    run_command,
)
from distmed.errors import UserError

if TYPE_CHECKING:  # for annotations; imported where used, after parsing
    from distmed.space import SearchSpaceFile

MAX_TRIALS = 100_000  # --num-samples, --max-concurrent: beyond any search one cluster runs

EXAMPLES = """examples (a shipped space by name, or a YAML path):
  python -m distmed.tune --space demo
  python -m distmed.tune --space scratch \\
      --data ~/data/pneumoniamnist.npz --cpu --num-samples 1
  python -m distmed.tune --space resnet --data /data/xray --address auto \\
      --storage s3://bucket/distmed --workers 2 --wandb-project xray
  python -m distmed.tune --space demo --name demo-1 --resume
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distmed.tune",
        description="Search hyperparameters with Ray Tune + Optuna TPE; every trial is a "
        "k-fold cross-validated Ray Train run scored on mean CV ROC-AUC.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--space",
        required=True,
        help="search-space YAML, or the name of a shipped one without a path, e.g. demo, "
        "resnet (ImageNet transfer learning), scratch (random init, offline)",
    )
    parser.add_argument(
        "--num-samples",
        type=bounded(int, 1, MAX_TRIALS, "20"),
        help=f"number of trials, 1 to {MAX_TRIALS}, e.g. 20 (search.num_samples)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=bounded(float, 0.01, 8, "0.5"),
        help="GPUs per Train worker, e.g. 0.5 packs 2 trials per GPU",
    )
    parser.add_argument(
        "--max-concurrent",
        type=bounded(int, 1, MAX_TRIALS, "4"),
        help="at most this many trials at once, e.g. 4",
    )
    parser.add_argument(
        "--name", help="experiment name (default: <space>-<time>); reuse with --resume"
    )
    parser.add_argument(
        "--storage",
        default="runs",
        help="results root: a folder or a URI such as s3://bucket/path (default runs)",
    )
    parser.add_argument(
        "--address", help="join a running Ray cluster, e.g. auto or ray://head:10001"
    )
    parser.add_argument("--wandb-project", help="log one W&B run per trial to this project")
    parser.add_argument(
        "--mlflow-uri",
        help="log one MLflow run per trial, and the best model and report, to this tracking "
        "server, e.g. http://mlflow.lab:5000 (token: MLFLOW_TRACKING_TOKEN)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the experiment --name in --storage"
    )
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over --name's lock left by a process on another host that has ended",
    )
    parser.add_argument(
        "--nested",
        type=bounded(int, 2, 20, "3"),
        metavar="K",
        help="nested cross-validation: K outer folds, each with its own search on the rest; "
        "the mean outer score estimates the whole procedure (K x the cost; no model kept)",
    )
    parser.add_argument(
        "--warm-start",
        metavar="RUN_DIR",
        help="give the sampler the completed trials of an earlier search on the same images, "
        "e.g. runs/demo-1 (its trials outside this space are left out)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=positive_fraction,
        help="binary tasks: the operating threshold reaching this out-of-fold sensitivity, "
        "e.g. 0.95 (default: Youden's J)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check, print the resolved search, then exit"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and Tune's full status"
    )
    add_common_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, _run)  # args.argv: for the --resume hint


def _run(args: argparse.Namespace) -> int:
    from distmed import pipeline
    from distmed.nested import NestedRun, outer_assignment, run_nested
    from distmed.searchfile import check_same_images, record_search

    started = time.perf_counter()
    spec = _load_spec(args)
    pipeline.warn_frozen_random_stages(spec)
    pipeline.warn_of_double_balancing(spec)
    if args.dry_run:
        print(pipeline.dry_run(spec, args.warm_start, args.nested))
        return 0
    name, resume = _name(args)
    ctx = pipeline.RunContext.create(name, args.storage, args.resume, args.verbose, resume)
    record = pipeline.claim(ctx, spec, args.nested, args.force_unlock, args.locks)
    prepared = pipeline.prepare(
        spec.base, pipeline.batch_sizes(spec), pipeline.models_to_check(spec)
    )
    if record is not None:  # a resumed search: on the images it started with
        check_same_images(ctx.experiment_uri, record, prepared.data.index)
    warm = pipeline.warm_start(args.warm_start, spec, prepared, ctx, args.nested)
    # An impossible K is refused before Ray starts or the name is taken.
    outer = outer_assignment(prepared.data, args.nested, spec) if args.nested else None
    data = pipeline.connect(prepared.data, args.address, ctx.experiment_uri, args.verbose)
    pipeline.open_results(ctx)
    if not ctx.resume:
        record_search(ctx.experiment_uri, spec, prepared.data.index, args.nested)
    if outer is not None:  # --nested K
        return run_nested(NestedRun(spec, data, ctx, outer, args.nested))
    outcome = pipeline.run_search(spec, data, ctx, warm)
    with pipeline.after_search(ctx):  # Ctrl-C stops at once; an unwritable folder: one line
        summary = pipeline.summarize(ctx, spec, prepared, outcome, warm)
        if outcome.interrupted or outcome.best is None:  # no refit: nothing (yet) to refit
            pipeline.save_summary(summary, ctx, wall_time_s=time.perf_counter() - started)
            pipeline.publish(ctx)
            return pipeline.stopped(summary, ctx)
        pipeline.save_summary(summary, ctx)  # the search result is safe before the refit
        chosen = summary.best_config
        assert chosen is not None  # a best trial has its config
        final = pipeline.finalize(chosen, outcome, data, ctx, args.target_sensitivity)
        update = {**final.summary_update(), "wall_time_s": time.perf_counter() - started}
        summary = pipeline.save_summary(summary, ctx, **update)
        report = pipeline.write_report(ctx)
        pipeline.publish(ctx)
        mlflow_run = pipeline.log_to_mlflow(spec, ctx, outcome.best, summary)
        print(pipeline.format_results(outcome, summary, ctx, report, mlflow_run))
        return 0


def _name(args: argparse.Namespace) -> tuple[str, str]:
    """The run's name and its --resume command, after the checks that need no data."""
    if args.resume and not args.name:
        raise UserError("--resume needs --name: the experiment to continue (a folder in --storage)")
    name = args.name or f"{Path(args.space).stem[:80]}-{datetime.now():%Y%m%d-%H%M%S}"
    return name, resume_command("distmed.tune", args.argv, name)


def _load_spec(args: argparse.Namespace) -> SearchSpaceFile:
    from distmed.space import load_space

    named = {  # this CLI's own options that set a config key
        "scaling.gpus_per_worker": args.gpus_per_worker,
        "tracking.wandb.project": args.wandb_project or None,
        "tracking.mlflow.uri": args.mlflow_uri or None,
    }
    overrides = overrides_from_args(args) + [f"{k}={v}" for k, v in named.items() if v is not None]
    spec = load_space(args.space, overrides)
    given = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent}
    updates = {key: value for key, value in given.items() if value is not None}
    return spec.with_search(**updates) if updates else spec


if __name__ == "__main__":
    sys.exit(main())
