"""An exclusive lock on a folder, so two sweeps never write one folder's records at the same time.

``flock(2)`` on the folder itself: the lock belongs to the open file description, which the holder's children
inherit, and the kernel drops it when the last process holding it exits — also after SIGKILL — so a lock is never
left behind. The holder's PID is written to ``.sweep.pid`` for the message of a refused second sweep.

The sweep (bash) opens the folder on a descriptor it keeps, and locks that descriptor through
``python -m memory_test.cli_common.folder_lock FD FOLDER HOLDER_PID`` (exit 0: locked; 2: busy, one line saying by
whom). Python callers use :class:`FolderLock`.
"""

from __future__ import annotations

import fcntl
import os
import sys
from contextlib import suppress
from pathlib import Path

from memory_test.cli_common.errors import ToolError, error_line
from memory_test.cli_common.files import atomic_write_text

HOLDER_FILE = ".sweep.pid"


class FolderBusy(ToolError):
    def __init__(self, folder: Path, holder: int | None):
        self.holder = holder
        who = "another process (PID unknown)" if holder is None else f"another sweep (PID {holder})"
        if holder is not None and not _alive(holder):
            who += ", which has exited; a process it started still holds it"
        super().__init__(
            f"{folder} is locked by {who}",
            "wait for it to finish"
            + (f" or stop it (`kill {holder}`)" if holder is not None else "")
            + ", or write into another folder (--output-dir)",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_pid(folder: str | os.PathLike) -> int | None:
    """The PID the current holder wrote, if readable."""
    try:
        return int((Path(folder) / HOLDER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def lock_descriptor(fd: int, folder: str | os.PathLike, holder: int) -> None:
    """Take the lock on the open descriptor ``fd`` of ``folder`` without waiting; FolderBusy if someone has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderBusy(Path(folder), holder_pid(folder)) from None
    atomic_write_text(Path(folder) / HOLDER_FILE, f"{holder}\n")


class FolderLock:
    """``with FolderLock(folder):`` holds the folder's lock for the block (FolderBusy if another process has it)."""

    def __init__(self, folder: str | os.PathLike, holder: int | None = None):
        self.folder, self.holder = Path(folder), holder if holder is not None else os.getpid()
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            lock_descriptor(fd, self.folder, self.holder)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if holder_pid(self.folder) == self.holder:
            with suppress(FileNotFoundError):
                (self.folder / HOLDER_FILE).unlink()
        os.close(self.fd)  # the last descriptor of this open file: the kernel drops the lock
        self.fd = None


def main(argv: list[str]) -> int:
    """``FD FOLDER HOLDER_PID``: lock the caller's inherited descriptor (it keeps the lock after we exit)."""
    fd, folder, holder = int(argv[0]), argv[1], int(argv[2])
    try:
        lock_descriptor(fd, folder, holder)
    except FolderBusy as e:
        print(error_line("run_all_experiments.sh", e.what, e.fix), file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
