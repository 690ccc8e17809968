"""The callbacks a fit's Ray Train controller unpickles stay light: every fit (every trial of
a search) pays this module's imports in a fresh controller process."""

from __future__ import annotations

import json
import subprocess
import sys

# What the modules the callbacks once lived in (cv, search, refit) pulled into every
# controller: ~1.3-1.8 CPU-s a fit on 2 cores (distmed/fitcallbacks.py's docstring).
HEAVY = ("sklearn", "scipy", "optuna", "iterstrat", "distmed.cv", "distmed.search")


def test_the_controllers_callbacks_import_nothing_heavy():
    code = (
        "import sys, json, pickle\n"
        # A pickled callback names its class by module (cloudpickle, as Ray sends them), so
        # unpickling one on the controller imports this module and nothing more. (ReportToTune
        # is made only inside a Tune trial.)
        "from distmed.fitcallbacks import StopOnUserError, RefitEpochLines\n"
        "for callback in (StopOnUserError(), RefitEpochLines(2, print)):\n"
        "    pickle.loads(pickle.dumps(callback))\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(run.stdout.strip().splitlines()[-1]))
    assert [name for name in HEAVY if name in loaded] == []
    assert "distmed.fitcallbacks" in loaded  # the check ran in the module's process
