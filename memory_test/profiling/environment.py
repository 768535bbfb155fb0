"""The ``env`` block of a record: hardware, driver, library versions, git state, host and time."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

_PACKAGES = ("torch", "opacus", "diffusers", "triton", "numpy", "nvidia-ml-py")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


GIT_SHA_ENV = "MEMORY_TEST_GIT_SHA"  # for a copy of the tree without .git (a GPU box): the commit it was copied from


def git_state(repo: Path | None = None) -> dict:
    """Commit sha and whether tracked files differ from it (untracked files are ignored).

    ``MEMORY_TEST_GIT_SHA`` (set by whoever copied the tree) wins when set: recorded with ``source: "env"`` and
    ``dirty`` unknown (null). Otherwise the checkout's own HEAD, or null without one.
    """
    repo = repo or Path(__file__).resolve().parents[2]
    given = os.environ.get(GIT_SHA_ENV, "").strip()
    if given:  # set by whoever copied the tree: a copy may carry a stale .git (the GPU box's does) that would lie
        return {"sha": given, "dirty": None, "source": "env"}
    sha = _git(repo, "rev-parse", "HEAD")
    if sha is None:
        return {"sha": None, "dirty": None, "source": None}
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status), "source": "git"}


def _nvml_driver() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        cuda_drv = pynvml.nvmlSystemGetCudaDriverVersion()
        return {
            "driver_version": drv.decode() if isinstance(drv, bytes) else drv,
            "cuda_driver_version": f"{cuda_drv // 1000}.{(cuda_drv % 1000) // 10}",
        }
    except Exception as e:
        return {"driver_version": None, "nvml_error": str(e)}


def environment(device: torch.device) -> dict:
    """Everything needed to tell whether two records are comparable."""
    env = {
        "device_type": device.type,
        "gpu_name": None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_total_memory_bytes": None,
        "gpu_capability": None,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {pkg: _version(pkg) for pkg in _PACKAGES},
        "git": git_state(),
        "host": socket.gethostname(),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["gpu_name"] = props.name
        env["gpu_total_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env.update(_nvml_driver())
    return env
