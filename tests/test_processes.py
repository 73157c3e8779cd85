"""The helpers in tests/processes.py that the process-tree tests (runserver, node) rely on."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.processes import python

# Prints whether SIGINT is ignored, then waits to be interrupted.
SCRIPT = "import signal, time; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True); time.sleep(120)"


def as_background_job(argv: list[str]) -> subprocess.Popen:
    """argv started as `argv &` in a non-interactive shell starts it: with SIGINT ignored."""
    return subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_process_started_with_python_obeys_sigint_even_from_a_background_job():
    plain = as_background_job([sys.executable, "-c", SCRIPT])
    try:
        # What the tests must not depend on: the ignored SIGINT is inherited through exec.
        assert plain.stdout.readline().strip() == "True"
    finally:
        plain.kill()
        plain.communicate()
    proc = as_background_job(python("-c", SCRIPT))
    try:
        assert proc.stdout.readline().strip() == "False"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, (proc.returncode, err)
