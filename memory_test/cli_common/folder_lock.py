"""An exclusive lock on a folder, so two sweeps never write one folder's records at the same time.

``flock(2)`` on the folder itself: the lock belongs to the open file description, which the holder's children
inherit, and the kernel drops it when the last process holding it exits — also after SIGKILL — so a lock is never
left behind. The holder's PID is written to ``.sweep.pid`` for the message of a refused second sweep.

The sweep (bash) opens the folder on a descriptor it keeps, and locks that descriptor through
``python -m memory_test.cli_common.folder_lock FD FOLDER HOLDER_PID`` (exit 0: locked; 2: busy, one line saying by
whom). Python callers use :class:`FolderLock`.

A writer that is not a sweep (single_experiment run by hand) holds the folder shared for its run
(:func:`writing_into`): refused while a sweep holds it, and a sweep is refused while it runs. The sweep names its
descriptor in ``SWEEP_FD_ENV`` for its configurations, which hold the lock through it (:func:`inherited_lock`).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from memory_test.cli_common.errors import ToolError, error_line
from memory_test.cli_common.files import atomic_write_text

HOLDER_FILE = ".sweep.pid"
SWEEP_FD_ENV = "MEMORY_TEST_SWEEP_LOCK_FD"  # the sweep's locked descriptor of its folder, which its children inherit


class FolderBusy(ToolError):
    def __init__(self, folder: Path, holder: int | None, flag: str = "--output-dir"):
        self.holder = holder
        who = "another process (PID unknown)" if holder is None else f"another sweep (PID {holder})"
        if holder is not None and not _alive(holder):
            who += ", which has exited; a process it started still holds it"
        super().__init__(
            f"{folder} is locked by {who}",
            "wait for it to finish"
            + (f" or stop it (`kill {holder}`)" if holder is not None else "")
            + f", or write into another folder ({flag})",
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


def inherited_lock(folder: str | os.PathLike) -> bool:
    """Whether this process holds ``folder``'s lock through the descriptor a sweep passed on (``SWEEP_FD_ENV``):
    then it is one of the sweep's configurations, writing into the folder the sweep locked."""
    text = os.environ.get(SWEEP_FD_ENV, "")
    if not text.isdigit():
        return False
    fd = int(text)
    try:
        if not os.path.samestat(os.fstat(fd), os.stat(folder)):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op on the open file that holds the lock
    except OSError:  # closed (a grandchild: Python closes descriptors), or someone else's lock (BlockingIOError)
        return False
    return True


@contextmanager
def writing_into(folder: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold ``folder`` shared while one writer that is not a sweep runs: FolderBusy (naming ``flag`` for another
    folder) while a sweep holds it; a sweep started meanwhile is refused. Several such writers may share a folder;
    a sweep's own configurations pass through its lock, and a folder not yet made has no sweep."""
    folder = Path(folder)
    if not folder.is_dir() or inherited_lock(folder):
        yield
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(folder, holder_pid(folder), flag) from None
        yield
    finally:
        os.close(fd)  # the kernel drops the shared lock


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
