"""run_cli: the exit code a command's outcome maps to (a user's bad path or text included: one line,
exit 2; a bug: its traceback, exit 1), with and without interpreter teardown."""
from __future__ import annotations

import subprocess

import pytest
from helpers import PYTHON, REPO_ROOT

OUTCOMES = {
    "return 75": ("lambda: 75", 75, ""),
    "return None": ("lambda: None", 0, ""),
    "SystemExit(3)": ("lambda: (_ for _ in ()).throw(SystemExit(3))", 3, ""),
    "UserError": ("lambda: (_ for _ in ()).throw(UserError('no data', hint='run prepare'))", 2,
                  "t: error: no data (HINT: run prepare)"),
    # OSErrors on the user's paths, and text that is not UTF-8, are bad input too
    "OSError on a path": ("lambda: open('/proc/no-such-dir/x', 'w')", 2,
                          "t: error: /proc/no-such-dir/x: No such file or directory (HINT: check the path)\n"),
    "full disk, no path": ("lambda: (_ for _ in ()).throw(OSError(28, 'No space left on device'))", 2,
                           "t: error: a file operation: No space left on device (HINT: free some space there"),
    "not UTF-8": ("lambda: bytes([0x61, 0xff]).decode()", 2,
                  "t: error: an input file is not UTF-8 text (invalid byte at offset 1)"),
    "usage error": ("lambda: ArgumentParser(prog='t').parse_args(['--nope'])", 2,
                    "t: error: unrecognized arguments: --nope (HINT: python -m t --help lists the options)\n"),
    # an OSError that is about no file of the user's is a bug: its traceback, exit 1
    "OSError of ours": ("lambda: (_ for _ in ()).throw(ConnectionRefusedError(111, 'Connection refused'))", 1,
                        "Traceback"),
}


@pytest.mark.parametrize("skip_teardown", [False, True])
@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_exit_codes_and_teardown(outcome, skip_teardown):
    main, code, message = OUTCOMES[outcome]
    script = ("import atexit\n"
              "from ds_gpt.errors import ArgumentParser, UserError, run_cli\n"
              "atexit.register(lambda: print('teardown ran', flush=True))\n"
              f"run_cli({main}, prog='t', skip_teardown={skip_teardown})\n")
    proc = subprocess.run([PYTHON, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    if code == 2:  # one line, no traceback
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("t: error: "), proc.stderr
    # The trainer's exit skips teardown, where other libraries' leftover threads can abort the process.
    # (A bug's exception leaves run_cli, and Python exits the usual way.)
    assert ("teardown ran" in proc.stdout) == (not skip_teardown or code == 1)


@pytest.mark.parametrize("main, argv, shown", [
    ("ds_gpt.sample", [], ["tokens generated per sample (default: 50)", "(default: 0.8)", "(default: 1337)"]),
    ("ds_gpt.bench.__main__", ["checkpoint"], ["ZeRO stage of the engine saved (default: 1)", "(default: 124M)",
                                              "precision of the engine (default: float32)"]),
    ("ds_gpt.bench.__main__", ["memory"], ["(default: 3000)", "ZeRO stage of the trainer's engine (default: 1)"]),
    ("ds_gpt.bench.__main__", ["step"], ["(default: 1)", "(default: float32)", "(default: 20)"]),
    ("ds_gpt.bench.__main__", ["loader"], ["(default: 6)", "(default: 400)"]),
    ("ds_gpt.bench.__main__", ["prepare"], ["(default: 3)"]),
])
def test_every_help_shows_the_defaults(main, argv, shown, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(main).main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare the words
    assert stop.value.code == 0 and all(s in text for s in shown), text
