"""The front doors' `--help`: what it says works without the repository checkout, lists only
what the command does, and prints (as argparse errors do) before torch or Ray is imported."""

from __future__ import annotations

import re
import shlex

import pytest

from distmed import report, train, tune
from distmed.shipped import SPACES_DIR, space_path


def example_lines(help_text: str) -> list[list[str]]:
    """The example commands of a help epilog (backslash-continued lines joined), as argv."""
    joined = help_text.replace("\\\n", " ")
    return [
        shlex.split(line.split("example:")[-1])
        for line in joined.splitlines()
        if re.search(r"python -m distmed\.\w+ ", line)
    ]


@pytest.mark.parametrize("module", [train, tune], ids=["train", "tune"])
def test_help_examples_name_no_file_of_the_repository_checkout(module):
    """`--config search_spaces/demo.yaml` exists only in a checkout (new-user try, pip
    install): a shipped space is named without a path, as `distmed.shipped` resolves it."""
    examples = example_lines(module.build_parser().epilog)
    assert examples
    for argv in examples:
        for option, value in zip(argv, argv[1:], strict=False):
            assert not value.startswith(("search_spaces/", "../")), argv
            if option in ("--config", "--space") and "/" not in value and "." not in value:
                assert space_path(value).parent == SPACES_DIR, argv  # a shipped name


def test_train_example_config_loads_outside_the_checkout(tmp_path, monkeypatch):
    from distmed.config import load_config

    monkeypatch.chdir(tmp_path)  # no search_spaces/ here
    (argv,) = example_lines(train.build_parser().epilog)
    cfg = load_config(argv[argv.index("--config") + 1], [])
    assert cfg.data.root == "demo"  # the shipped demo space's `base`


def test_report_help_lists_no_target_sensitivity_and_the_old_option_says_where_it_went(
    capsys,
):
    """The threshold is chosen when the search ends (`distmed.tune --target-sensitivity`);
    report never writes the model, so its --help must not offer the option."""
    assert "--target-sensitivity" not in report.build_parser().format_help()
    assert "--target-sensitivity" in tune.build_parser().format_help()
    assert report.main(["somewhere", "--target-sensitivity", "0.95"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --target-sensitivity:") and "distmed.tune" in err
    assert err.count("\n") == 1


# What a front door's module may import before its command line is parsed: none of these
# (torch alone is seconds of CPU on a loaded host; `--help` printed nothing meanwhile).
HEAVY = ("torch", "torchvision", "ray", "sklearn", "scipy", "pandas", "optuna", "matplotlib")
FRONT_DOORS = (
    "distmed",
    "distmed.train",
    "distmed.tune",
    "distmed.evaluate",
    "distmed.predict",
    "distmed.export",
    "distmed.report",
    "distmed.app",
    "distmed.data",
)
PROBE = """import contextlib, io, runpy, sys
for argv in (["--help"], ["--no-such-option"]):
    sys.argv = ["prog", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit as done:
            status = done.code
    print(status, repr(out.getvalue()[:6]), "error:" in err.getvalue())
print(sorted(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.mark.parametrize("module", FRONT_DOORS)
def test_help_and_a_bad_option_answer_before_torch_or_ray_is_imported(module):
    """`python -m MODULE --help` and `python -m MODULE --no-such-option`, as run by `-m`
    (runpy, in a fresh interpreter): the help is printed, the error said in one line, and
    no heavy library was imported on the way."""
    import subprocess
    import sys

    code = PROBE.format(module=module, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    helped, refused, loaded = done.stdout.strip().splitlines()
    assert helped == "0 'usage:' False"
    assert refused == "2 '' True"
    assert loaded == "[]"
