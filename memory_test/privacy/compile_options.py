"""What torch.compile arguments ask for, read the same way by the compiled engine and its post-backward programs."""

from __future__ import annotations


def uses_cuda_graphs(compile_kwargs: dict) -> bool:
    """Whether torch.compile arguments turn on Inductor's CUDA graphs (mode='reduce-overhead' or triton.cudagraphs)."""
    options = compile_kwargs.get("options") or {}
    return compile_kwargs.get("mode") == "reduce-overhead" or bool(options.get("triton.cudagraphs"))


def without_cuda_graphs(compile_kwargs: dict) -> dict:
    """The same arguments with CUDA graphs off (reduce-overhead becomes the default mode)."""
    kwargs = dict(compile_kwargs)
    if kwargs.get("mode") == "reduce-overhead":
        kwargs.pop("mode")
    if "options" in kwargs:
        kwargs["options"] = {**kwargs["options"], "triton.cudagraphs": False}
    return kwargs
