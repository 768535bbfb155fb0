"""Run a command that dies with its parent: ``python -m memory_test.cli_common.child_of PID -- COMMAND ...``.

The sweep starts each configuration through this, so a sweep killed with SIGKILL (no trap runs) leaves no orphan
that keeps measuring under contention and writes a record later: Linux' PR_SET_PDEATHSIG sends the child SIGTERM
when its parent dies, and it survives the exec into COMMAND. COMMAND must unwind on SIGTERM (single_experiment
does: no record, probes stopped). Elsewhere (no prctl) the command just runs; the sweep's folder lock, which the
child inherits, then still refuses a new sweep until it has finished.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for ``sig`` when the parent exits; True if it could. Sends it now if the parent is gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m memory_test.cli_common.child_of PARENT_PID -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    die_with_parent(int(argv[0]))
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
