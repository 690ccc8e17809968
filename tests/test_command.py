"""`distmed <command>`: the one command dispatches to each front door's own `main(argv)`."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module, metadata
from pathlib import Path

import pytest
from test_cli import COMMANDS as CONSOLE_SCRIPTS
from test_layers import FRONT_DOORS

from distmed import __main__ as command
from distmed import report, tune

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "search_spaces" / "demo.yaml")


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as done:
        command.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"distmed {metadata.version('distmed')}"


def test_version_loads_neither_torch_nor_ray():
    import subprocess

    code = (
        "import sys\nfrom distmed.__main__ import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]")


@pytest.mark.parametrize("name", sorted(command.COMMANDS))
def test_each_command_shows_its_own_modules_help_under_the_name_typed(name, capsys):
    """`distmed tune --help` is distmed.tune's help, its usage line and examples saying
    `distmed tune`; `python -m distmed.tune --help` still says `python -m distmed.tune`."""
    module = import_module(command.COMMANDS[name][0])
    parser = module.build_parser()
    with pytest.raises(SystemExit) as done:
        command.main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distmed {name} ") and parser.prog not in out
    for action in parser._actions:  # each option it offers (not a hidden, moved one)
        if action.help != argparse.SUPPRESS:
            assert all(option in out for option in action.option_strings)
    with pytest.raises(SystemExit):
        module.main(["--help"])  # after the dispatch: the module's own name again
    assert capsys.readouterr().out == parser.format_help()


def test_a_bad_option_of_a_command_names_the_command_as_typed(capsys):
    assert command.main(["report", "--bootstrap", "0", "somewhere"]) == 2
    assert capsys.readouterr().err.startswith("error: distmed report: ")
    assert report.main(["--bootstrap", "0", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: python -m distmed.report: ")


def test_a_command_runs_its_modules_main_with_the_rest_of_the_line(capsys):
    assert command.main(["tune", "--space", DEMO, "--dry-run"]) == 0
    through_distmed = capsys.readouterr().out
    assert tune.main(["--space", DEMO, "--dry-run"]) == 0
    assert through_distmed == capsys.readouterr().out
    assert "optim.lr" in through_distmed


def test_a_bad_command_line_inside_a_command_keeps_its_exit_status(capsys):
    assert command.main(["tune", "--num-samples", "0", "--space", DEMO]) == 2
    assert "--num-samples" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--space", "demo"]])
def test_no_or_an_unknown_command_is_one_line_listing_the_commands(argv, capsys):
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: distmed:") and err.count("\n") == 1
    if argv:
        assert "'tune'" in err and "'predict'" in err


def test_every_front_door_is_a_command_and_a_console_script():
    modules = {module for module, _ in command.COMMANDS.values()}
    assert modules == (FRONT_DOORS - {"distmed.cli", "distmed.__main__"}) | {
        "distmed.data.__main__"
    }
    # test_cli checks pyproject's console scripts against this table.
    scripts = {f"distmed-{name}": module for name, (module, _) in command.COMMANDS.items()}
    assert {**scripts, "distmed": "distmed.__main__"} == CONSOLE_SCRIPTS
