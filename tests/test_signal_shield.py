"""ds_gpt.signal_shield: the shielded command outlives SIGTERM, even with a Python handler of its own,
and a trainer's ranks started under it still hear SIGTERM."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import PYTHON, REPO_ROOT

# What the deepspeed launcher does: its own SIGTERM handler, which would end the process.
LAUNCHER = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))\n"
            "print('ready', flush=True)\n"
            "time.sleep(3)\n"
            "print('still here', flush=True)\n")
# A rank: GracefulStop.install() must take SIGTERM back even when it arrives blocked.
RANK = ("import os, signal, time\n"
        "from ds_gpt.signals import GracefulStop\n"
        "stop = GracefulStop().install()\n"
        "print('ready', flush=True)\n"
        "for _ in range(100):\n"
        "    if stop.requested: break\n"
        "    time.sleep(0.05)\n"
        "print('stop requested' if stop.requested else 'no stop', flush=True)\n")


def shielded(code: str) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-m", "ds_gpt.signal_shield", sys.executable, "-c", code], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    return proc


@pytest.mark.slow  # ~3 s of waiting on signals between processes
def test_a_shielded_launcher_outlives_sigterm_but_not_sigkill():
    proc = shielded(LAUNCHER)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "still here\n"
    proc = shielded(LAUNCHER)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_a_rank_started_under_the_shield_still_hears_sigterm():
    proc = shielded(RANK)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "stop requested\n", err
    assert "SIGTERM received" in err


def test_a_command_that_is_not_there_is_named():
    proc = subprocess.run([PYTHON, "-m", "ds_gpt.signal_shield", "no-such-launcher"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 127 and "cannot run no-such-launcher" in proc.stderr
