#!/usr/bin/env bash
# Set-up and everyday commands; each installs what it needs into .venv and is safe to repeat.
#   bash dev.sh demo   cross-validate on the built-in synthetic demo data, print the result
#   bash dev.sh test   run the test suite (what CI runs)
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

case "${1:-}" in
    demo)
        ensure_env
        shift
        exec "$VENV/bin/python" -m distmed.train --config search_spaces/demo.yaml "$@"
        ;;
    test)
        ensure_env
        shift
        "$VENV/bin/python" -m ruff check distmed tests benchmarks
        "$VENV/bin/python" -m ruff format --check --quiet distmed tests benchmarks
        exec "$VENV/bin/python" -m pytest "$@"
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
        echo "usage: bash dev.sh demo|test|gpu-check [extra arguments]" >&2
        exit 2
        ;;
esac
