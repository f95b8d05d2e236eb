"""run_cli: the exit code a command's outcome maps to, with and without interpreter teardown."""
from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, REPO_ROOT

OUTCOMES = {
    "return 75": ("lambda: 75", 75, ""),
    "return None": ("lambda: None", 0, ""),
    "SystemExit(3)": ("lambda: (_ for _ in ()).throw(SystemExit(3))", 3, ""),
    "UserError": ("lambda: (_ for _ in ()).throw(UserError('no data', hint='run prepare'))", 2,
                  "t: error: no data (HINT: run prepare)"),
}


@pytest.mark.parametrize("skip_teardown", [False, True])
@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_exit_codes_and_teardown(outcome, skip_teardown):
    main, code, message = OUTCOMES[outcome]
    script = ("import atexit\n"
              "from ds_gpt.errors import UserError, run_cli\n"
              "atexit.register(lambda: print('teardown ran', flush=True))\n"
              f"run_cli({main}, prog='t', skip_teardown={skip_teardown})\n")
    proc = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and message in proc.stderr
    # The trainer's exit skips teardown, where other libraries' leftover threads can abort the process.
    assert ("teardown ran" in proc.stdout) == (not skip_teardown)
