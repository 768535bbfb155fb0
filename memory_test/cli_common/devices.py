"""``--device auto|cpu|cuda|cuda:N`` for every tool: the torch device, or a one-line error saying what to use.

Imports torch when called (the rest of cli_common is standard library only).
"""

from __future__ import annotations

from memory_test.cli_common.errors import ToolError


def resolve_device(name: str):
    """The torch device ``name`` names ("auto": cuda if a GPU is visible, else cpu); ToolError if it is not here."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ToolError(f"--device {name!r}: {e}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ToolError(
                f"--device {name} requested but no CUDA GPU is available (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda})",
                "use --device cpu (or auto)",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ToolError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible", "use another index")
    elif dev.type != "cpu":
        raise ToolError(f"--device {name!r}: only cpu and cuda are supported", "use auto, cpu, cuda or cuda:N")
    return dev


def require_cuda(tool: str) -> None:
    """ToolError unless a CUDA GPU is visible: for the GPU checks and benchmarks that have no CPU path."""
    import torch

    if not torch.cuda.is_available():
        raise ToolError(
            f"{tool} measures on a CUDA GPU and none is available (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda})",
            "run it on the GPU box (scripts/gpu_session.sh); on CPU use scripts/host_overhead.py",
        )
