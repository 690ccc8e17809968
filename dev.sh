#!/usr/bin/env bash
# Set-up and everyday commands; each installs what it needs into .venv and is safe to repeat.
#   bash dev.sh demo   the demo search (Tune + Optuna over 5-fold CV on the built-in data)
#   bash dev.sh cv     one configuration, 5-fold cross-validated on the built-in demo data
#   bash dev.sh test   install the tests' browser if missing, run ruff, mypy and pytest (what CI runs;
#     4 pytest-xdist processes, the session's Ray tests in two of them, then the `serial` tests:
#     `run_tests` below)
#   bash dev.sh test-fast   pytest without the Ray and GPU tests (-m "not ray and not gpu", -n 2), no
#     ruff or mypy: the ~2-minute loop while editing; `test` before a commit still runs everything
#   bash dev.sh gpu-check   on a CUDA machine: gpu tests, train, packed search, throughput
#     (PYTHON=python3 or DISTMED_PYTHON=...: use that interpreter as it is, make no .venv)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv

ensure_env() {
    local python="${PYTHON:-python3}" want stamp="$VENV/.installed"
    want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return
    fi
    [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # Plain pip: torch resolves from pyproject's ranges (locally cached wheels where present).
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
}

# The web page's browser test drives Debian's chromium (Playwright downloads none): install it
# with apt when missing, as root or through sudo; without either, say what to run.
ensure_browser() {
    command -v chromium >/dev/null 2>&1 && return
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo"
        else
            echo "dev.sh: the browser test needs chromium: run 'sudo apt-get install -y chromium'" >&2
            exit 1
        fi
    fi
    echo "dev.sh: installing chromium with apt (the web page's browser test)" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y chromium >/dev/null 2>&1 \
        || { $sudo apt-get update -qq && $sudo apt-get install -y chromium >/dev/null; }
}

# pytest in two runs. First, ONE pytest-xdist run (`--dist loadfile`) of every test not marked
# `serial`: tests/conftest.py makes the files of each SESSION_RAY_GROUPS group one unit of work
# (one process that starts its own Ray instance once) and puts them first (the longest units;
# they mostly wait on Ray); the `own_ray` searches (subprocesses, each with its own Ray
# instance) come next, and every file without Ray is a unit of its own, filling the processes
# as they free up. Then the `serial` tests (bound by wall time: signals and deadlines, which
# need the cores to themselves) alone, without xdist. Extra arguments go to both runs; a run
# that selects no test (pytest's exit status 5) is no failure while the other ran tests. Both
# runs always run; the status is the first failure's.
run_tests() {
    local status=0 first second
    # One pytest-xdist run of everything not bound by wall time, on 4 processes: the session's
    # Ray tests in two of them (two groups, each with its own Ray instance; they mostly wait on
    # Ray, so two beside each other shorten the longest path), the `own_ray` searches in the
    # third, the files without Ray in the fourth and in whichever process is free next
    # (tests/conftest.py groups and orders them; torch gets one thread per process). Then the
    # `serial` tests, whose bounds are wall time, alone.
    "$VENV/bin/python" -m pytest -m "not serial" -n 4 --dist loadfile --no-loadscope-reorder \
        "$@" && first=0 || first=$?
    "$VENV/bin/python" -m pytest -m "serial" -p no:xdist "$@" && second=0 || second=$?
    if [ "$first" = 5 ] && [ "$second" = 5 ]; then
        return 5
    fi
    for code in "$first" "$second"; do
        if [ "$code" != 0 ] && [ "$code" != 5 ] && [ "$status" = 0 ]; then
            status=$code
        fi
    done
    return "$status"
}

case "${1:-}" in
    demo)
        ensure_env
        shift
        exec "$VENV/bin/python" -m distmed.tune --space search_spaces/demo.yaml "$@"
        ;;
    cv)
        ensure_env
        shift
        exec "$VENV/bin/python" -m distmed.train --config search_spaces/demo.yaml "$@"
        ;;
    test)
        ensure_env
        ensure_browser
        shift
        "$VENV/bin/python" -m ruff check distmed tests benchmarks
        "$VENV/bin/python" -m ruff format --check --quiet distmed tests benchmarks
        "$VENV/bin/python" -m mypy  # over distmed/, configured in pyproject.toml
        run_tests "$@"
        ;;
    test-fast)
        ensure_env
        ensure_browser
        shift
        exec "$VENV/bin/python" -m pytest -m "not ray and not gpu" -n 2 --dist loadfile "$@"
        ;;
    gpu-check)
        shift
        # A GPU machine may have no network: an interpreter that already holds torch and
        # distmed's dependencies is used as it is.
        python="${DISTMED_PYTHON:-${PYTHON:-}}"
        if [ -z "$python" ]; then
            ensure_env
            python="$VENV/bin/python"
        fi
        exec "$python" -m benchmarks.gpu_check "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|cv|test|test-fast|gpu-check [extra arguments]" >&2
        exit 2
        ;;
esac
