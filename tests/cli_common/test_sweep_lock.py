"""One sweep per output folder: the lock refuses a second one naming the holder, dies with its holder (also on
kill -9), and a killed sweep leaves no configuration running on as an orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memory_test.cli_common import folder_lock
from memory_test.cli_common.folder_lock import HOLDER_FILE, FolderBusy, FolderLock
from memory_test.diffusion_profile import single_experiment
from tests.conftest import REPO

SWEEP = REPO / "memory_test" / "diffusion_profile" / "run_all_experiments.sh"


def _running(pid: int) -> bool:
    """Some thread of it is alive and not a zombie (a killed child may wait to be reaped by init). The leader alone
    is not enough: it turns zombie while the process' other threads (torch's) still exit, holding its files."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            if (task / "stat").read_text().split(")")[-1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def _wait_until(condition, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_folder_lock_refuses_a_second_holder_and_is_released_by_sigkill(tmp_path):
    with FolderLock(tmp_path):
        assert (tmp_path / HOLDER_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(FolderBusy, match=f"locked by another sweep \\(PID {os.getpid()}\\)"), FolderLock(tmp_path):
            pass
    assert not (tmp_path / HOLDER_FILE).exists()  # released, and its note removed
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from memory_test.cli_common.folder_lock import FolderLock\n"
         f"with FolderLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=f"PID {holder.pid}"), FolderLock(tmp_path):
        pass
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
    with FolderLock(tmp_path):  # free again, the stale note notwithstanding
        pass


def test_child_of_gets_sigterm_when_its_parent_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"{sys.executable} -m memory_test.cli_common.child_of $$ -- sleep 600 & echo $! > {pid_file}; wait"
    parent = subprocess.Popen(["bash", "-c", script], cwd=REPO)
    assert _wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
    child = int(pid_file.read_text())
    assert _wait_until(lambda: "sleep" in Path(f"/proc/{child}/cmdline").read_text(), 30)  # exec'd
    parent.kill()
    parent.wait()
    assert _wait_until(lambda: not _running(child), 30), "the child outlived its killed parent"


def test_second_sweep_is_refused_and_kill_9_leaves_no_orphan(tmp_path):
    out = tmp_path / "res"
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    args = ["--experiments", "vanilla", "--batch-sizes", "1", "--device", "cpu", "--no-plots", "--output-dir", str(out)]
    first = subprocess.Popen(
        ["bash", str(SWEEP), *args, "--num-iter", "1000000", "--warmup-iter", "0"],  # runs until killed
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert _wait_until(lambda: _children(first.pid) and "single_experiment" in _cmdline(_children(first.pid)[0]))
        child = _children(first.pid)[0]
        assert [p.name for p in out.iterdir()] == [HOLDER_FILE]  # its log lives outside the folder, not shared
        second = subprocess.run(["bash", str(SWEEP), *args], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is locked by another sweep (PID {first.pid})" in second.stderr
        first.send_signal(signal.SIGKILL)  # no trap runs
        first.wait()
        assert _wait_until(lambda: not _running(child), 60), "the configuration outlived its sweep"
    finally:
        if first.poll() is None:
            first.kill()
    assert not list(out.glob("*.json")) and not list(out.glob(".*.tmp"))  # no record from a half-measured run
    with FolderLock(out):  # the lock went with the sweep and its child
        pass


def _by_hand(folder: Path, capsys) -> tuple[int, str]:
    """single_experiment run by hand into ``folder``: a record without a run (nothing measured, nothing slow)."""
    argv = ["--experiment", "vanilla", "--output", str(folder / "r.json"), "--model", "DiT-tiny", "--device", "cpu"]
    code = single_experiment.main([*argv, "--record-only", "skipped", "--record-message", "by hand"])
    return code, capsys.readouterr().err.strip()


def test_single_experiment_by_hand_is_refused_while_a_sweep_holds_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(folder_lock.SWEEP_FD_ENV, raising=False)
    with FolderLock(tmp_path):  # a sweep's lock (this process stands in for the sweep)
        code, err = _by_hand(tmp_path, capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"single_experiment.py: error: {tmp_path} is locked by another sweep (PID {os.getpid()})")
        assert err.endswith("or write into another folder (--output)") and not (tmp_path / "r.json").exists()
    code, err = _by_hand(tmp_path, capsys)  # the sweep is gone
    assert code == 0 and (tmp_path / "r.json").is_file(), err


def test_a_sweeps_own_configurations_write_through_its_lock(tmp_path, capsys, monkeypatch):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # the descriptor the sweep locks and its children inherit
    try:
        folder_lock.lock_descriptor(fd, tmp_path, os.getpid())
        monkeypatch.setenv(folder_lock.SWEEP_FD_ENV, str(fd))
        code, err = _by_hand(tmp_path, capsys)
        assert code == 0 and (tmp_path / "r.json").is_file(), err
        other = tmp_path / "other"  # the descriptor proves the lock of its own folder only
        other.mkdir()
        with FolderLock(other):
            assert _by_hand(other, capsys)[0] == 2
    finally:
        os.close(fd)


def test_a_sweep_is_refused_while_single_experiment_writes_into_its_folder(tmp_path):
    with folder_lock.writing_into(tmp_path, "--output"):
        with folder_lock.writing_into(tmp_path, "--output"):  # several writers by hand may share the folder
            with pytest.raises(FolderBusy, match="is locked by another process"), FolderLock(tmp_path):
                pass
    with FolderLock(tmp_path):
        pass
