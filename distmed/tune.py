"""`python -m distmed.tune --space FILE`: the hyperparameter search over CV ROC-AUC.

The front door: argv -> a search-space file and a `pipeline.RunContext` -> the stages of
`distmed.pipeline` in order (prepare -> Ray -> search -> finalize -> summary, report,
publish; nested CV through `distmed.nested`) -> what is printed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from distmed import pipeline
from distmed.cli import add_common_options, overrides_from_args, parse, run_entry_point
from distmed.errors import EXIT_INTERRUPTED, UserError
from distmed.nested import NestedRun, outer_assignment, run_nested
from distmed.searchfile import check_new_search, check_same_images, check_same_search, record_search
from distmed.space import SearchSpaceFile, load_space
from distmed.summary import RunSummary
from distmed.warmstart import WarmStart, load_warm_start, model_size_of

EXAMPLES = """examples:
  python -m distmed.tune --space search_spaces/demo.yaml
  python -m distmed.tune --space search_spaces/resnet.yaml \\
      --data ../shared/data/pneumoniamnist.npz --cpu --num-samples 1
  python -m distmed.tune --space search_spaces/resnet.yaml --data /data/xray --address auto \\
      --storage s3://bucket/distmed --workers 2 --wandb-project xray
  python -m distmed.tune --space search_spaces/demo.yaml --name demo-1 --resume
  python -m distmed.tune --space search_spaces/demo.yaml --mlflow-uri http://127.0.0.1:5000
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
        "--space", required=True, help="search-space YAML, e.g. search_spaces/resnet.yaml"
    )
    parser.add_argument(
        "--num-samples", type=int, help="number of trials, e.g. 20 (search.num_samples)"
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        help="GPUs per Train worker, e.g. 0.5 packs 2 trials per GPU",
    )
    parser.add_argument(
        "--max-concurrent", type=int, help="at most this many trials at once, e.g. 4"
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
        "--nested",
        type=int,
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
        type=float,
        help="binary tasks: the operating threshold reaching this out-of-fold sensitivity, "
        "e.g. 0.95 (default: Youden's J)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved base config and space, then exit"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's own logs and Tune's full status"
    )
    add_common_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the --resume hint
    return run_entry_point(_run, args)


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    spec = _load_spec(args)
    pipeline.warn_frozen_random_stages(spec)
    if args.dry_run:
        print(pipeline.describe_search(spec))
        return 0
    ctx = _context(args)
    record = check_same_search(ctx.experiment_uri, spec, args.nested) if ctx.resume else None
    if not ctx.resume:
        check_new_search(ctx.experiment_uri)
    prepared = pipeline.prepare(spec.base, pipeline.batch_sizes(spec))
    if ctx.resume:
        check_same_images(ctx.experiment_uri, record, prepared.data.index)
    warm = _warm_start(args, spec, prepared, ctx)
    # An impossible K is refused before Ray starts or the name is taken.
    outer = outer_assignment(prepared.data, args.nested, spec) if args.nested else None
    data = pipeline.connect(prepared.data, args.address, worker_logs=args.verbose)
    ctx.local.mkdir(parents=True, exist_ok=True)
    if not ctx.resume:
        record_search(ctx.experiment_uri, spec, prepared.data.index, args.nested)
    if outer is not None:  # --nested K
        return run_nested(NestedRun(spec, data, ctx, outer, args.nested))
    outcome = pipeline.run_search(spec, data, ctx, warm)
    summary = pipeline.summarize(ctx, spec, prepared, outcome, warm)
    if outcome.interrupted or outcome.best is None:  # no refit: nothing (yet) to refit
        pipeline.save_summary(summary, ctx, wall_time_s=time.perf_counter() - started)
        pipeline.publish(ctx)
        return _stopped(summary, ctx)
    pipeline.save_summary(summary, ctx)  # the search result is safe before the refit
    chosen = summary.best_config
    assert chosen is not None  # a best trial has its config
    final = pipeline.finalize(chosen, outcome, data, ctx, args.target_sensitivity)
    update = {**final.summary_update(), "wall_time_s": time.perf_counter() - started}
    summary = pipeline.save_summary(summary, ctx, **update)
    report = pipeline.write_report(ctx)
    pipeline.publish(ctx)
    mlflow_run = pipeline.log_to_mlflow(spec, ctx, outcome.best, summary)
    print(pipeline.format_results(outcome, summary, ctx, report))
    if mlflow_run is not None:
        uri = spec.base.tracking.mlflow.uri
        print(f"MLflow: best model and report in run {mlflow_run} at {uri}")
    return 0


def _context(args: argparse.Namespace) -> pipeline.RunContext:
    """The run's name and places, after the checks that need no data."""
    if args.resume and not args.name:
        raise UserError("--resume needs --name: the experiment to continue (a folder in --storage)")
    if args.nested is not None and not 2 <= args.nested <= 20:
        raise UserError(f"--nested {args.nested}: use 2 to 20 outer folds, e.g. --nested 3")
    target = args.target_sensitivity
    if target is not None and not 0.0 < target <= 1.0:
        raise UserError(f"--target-sensitivity {target}: must be in (0, 1], e.g. 0.95")
    name = args.name or f"{Path(args.space).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    resume = resume_command(args.argv, name)
    return pipeline.RunContext.create(name, args.storage, args.resume, args.verbose, resume)


def _warm_start(
    args: argparse.Namespace,
    spec: SearchSpaceFile,
    prepared: pipeline.Prepared,
    ctx: pipeline.RunContext,
) -> WarmStart | None:
    """--warm-start's trials (checked against the images before Ray starts); a resumed
    search's study has them already."""
    if not args.warm_start or ctx.resume:
        return None
    if args.nested:
        raise UserError(
            "--warm-start with --nested: each outer fold searches other images; warm-start "
            "a plain search"
        )
    size = None
    if spec.search.multi_objective:
        size = model_size_of(spec, len(prepared.data.index.class_names))
    return load_warm_start(args.warm_start, spec, prepared.data.index, size)


def _stopped(summary: RunSummary, ctx: pipeline.RunContext) -> int:
    """Ctrl-C: what finished, and how to continue. No trial completed: an error."""
    if not summary.interrupted:
        raise UserError(f"no trial completed (see {ctx.local / 'trials.csv'}); nothing to refit")
    print(pipeline.interrupted_text(summary, ctx), flush=True)
    return EXIT_INTERRUPTED


def resume_command(argv: list[str], name: str) -> str:
    """The command that continues this search: the same arguments, `--name`, `--resume`."""
    args = list(argv)
    if "--name" not in args and not any(a.startswith("--name=") for a in args):
        args += ["--name", name]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([sys.executable, "-m", "distmed.tune", *args])


def _load_spec(args: argparse.Namespace) -> SearchSpaceFile:
    overrides = overrides_from_args(args)
    if args.gpus_per_worker is not None:
        overrides.append(f"scaling.gpus_per_worker={args.gpus_per_worker}")
    if args.wandb_project:
        overrides.append(f"tracking.wandb.project={args.wandb_project}")
    if args.mlflow_uri:
        overrides.append(f"tracking.mlflow.uri={args.mlflow_uri}")
    spec = load_space(args.space, overrides)
    given = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent}
    updates = {key: value for key, value in given.items() if value is not None}
    return spec.with_search(**updates) if updates else spec


if __name__ == "__main__":
    sys.exit(main())
