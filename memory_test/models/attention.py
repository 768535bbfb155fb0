"""Self-attention processor for diffusers ``Attention`` that runs one known kernel per call and records which."""

from __future__ import annotations

import importlib
import itertools
import warnings
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from torch.backends.cuda import SDPAParams, can_use_cudnn_attention, can_use_efficient_attention
from torch.backends.cuda import can_use_flash_attention as can_use_sdpa_flash
from torch.nn.attention import SDPBackend, sdpa_kernel

# Names recorded for each kernel; "flash_attn" is the Dao-AILab package, the others are SDPA backends.
SDPA_NAMES = {
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.CUDNN_ATTENTION: "cudnn",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.MATH: "math",
}
SDPA_BACKENDS = {name: backend for backend, name in SDPA_NAMES.items()}  # str keys: Dynamo guards on lookups
_HALF = (torch.float16, torch.bfloat16)


def _load_flash_attn() -> tuple[object | None, str]:
    """The ``flash_attn_func`` of the flash_attn package, or None and why not."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func, ""
    except Exception as exc:  # a broken build (ABI mismatch) must read as "not available", with the reason kept
        return None, f"flash_attn package not importable ({type(exc).__name__}: {exc})"


class RecordingAttnProcessor:
    """AttnProcessor2_0 for self-attention without mask, pinned to one kernel per call; records what ran.

    ``use_flash_attention=True``: the flash_attn package (fp16/bf16 CUDA), else SDPA FlashAttention, else the
    first fused SDPA backend that can run (cuDNN, then memory-efficient), else math. Every step down is recorded
    in ``fallbacks`` and warned about once. On CPU: SDPA's CPU flash kernel, else math.
    ``use_flash_attention=False``: always SDPA math, the unfused reference.
    """

    def __init__(self, use_flash_attention: bool = True):
        self._trace_key = next(_NEXT_KEY)
        _PROCESSORS[self._trace_key] = self
        self.use_flash_attention = use_flash_attention
        self.calls: Counter[str] = Counter()
        self.fallbacks: dict[str, str] = {}
        self._flash_attn, self._flash_attn_reason = _load_flash_attn() if use_flash_attention else (None, "")
        self._cpu_choice: dict[tuple, SDPBackend] = {}
        # Kernels baked into torch.compile'd graphs (decided while tracing; compiled calls are not counted).
        self.compiled_kernels: set[str] = set()

    @property
    def backends_used(self) -> set[str]:
        return set(self.calls) | self.compiled_kernels

    @property
    def backend(self) -> str:
        """The kernel that ran: one name, "mixed:a+b" if several, "none" before the first call."""
        used = sorted(self.backends_used)
        if not used:
            return "none"
        return used[0] if len(used) == 1 else "mixed:" + "+".join(used)

    def reset(self) -> None:
        self.calls.clear()
        self.fallbacks.clear()
        self._cpu_choice.clear()
        self.compiled_kernels.clear()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("RecordingAttnProcessor handles DiT self-attention only (no context, no mask)")
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("RecordingAttnProcessor does not implement spatial_norm/group_norm attention")
        residual = hidden_states
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = k.shape[-1] // attn.heads
        # (B, S, H, D): flash_attn's layout; SDPA wants (B, H, S, D).
        q, k, v = (t.view(batch, seq, attn.heads, head_dim) for t in (q, k, v))
        # q/k norms act on the head dim only, so the (B, S, H, D) layout gives what AttnProcessor2_0 computes.
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self._attend(q, k, v, attn.scale)
        out = out.reshape(batch, seq, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if residual.ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, S, H, D) in and out, through the kernel the policy picks."""
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (B, H, S, D)
        if torch.compiler.is_compiling():
            # Decided once per traced graph, in plain Python, and recorded there: see _kernel_for_trace.
            _, seq, heads, head_dim = q.shape
            name = _kernel_for_trace(
                self._trace_key, q.device.type, q.device.index, q.dtype, seq, heads, head_dim, q.requires_grad, scale
            )
        else:
            name = self._choose(qt, kt, vt, scale)
            self.calls[name] += 1
        if name == "flash_attn":
            return self._flash_attn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)
        with sdpa_kernel([SDPA_BACKENDS[name]]):
            out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=0.0, is_causal=False, scale=scale)
        return out.transpose(1, 2)

    def _choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> str:
        """The recorded name of the kernel for SDPA-layout (B, H, S, D) inputs like these."""
        if self._flash_attn_ok(q):  # dtype and head dim only: the same in either layout
            return "flash_attn"
        return SDPA_NAMES[self._pick_sdpa(q, k, v, scale)]

    def _flash_attn_ok(self, q: torch.Tensor) -> bool:
        if self._flash_attn is None or not q.is_cuda:
            return False
        # The package's kernels take fp16/bf16 and head dims that are multiples of 8 up to 256.
        return q.dtype in _HALF and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256

    def _pick_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> SDPBackend:
        if not self.use_flash_attention:
            return SDPBackend.MATH
        if q.device.type == "cpu":
            return self._pick_cpu(q, k, v, scale)
        return self._pick_cuda(SDPAParams(q, k, v, None, 0.0, False, False))

    def _pick_cuda(self, params: SDPAParams) -> SDPBackend:
        """SDPA flash if it can run, else the first fused backend that can (recorded), else math (recorded)."""
        if can_use_sdpa_flash(params):
            return SDPBackend.FLASH_ATTENTION
        q = params.query
        why = f"SDPA flash cannot run on {q.dtype} {q.device.type} inputs with head_dim={q.shape[-1]}"
        if self._flash_attn_reason:
            why = f"{self._flash_attn_reason}; {why}"
        # Fused kernels before the O(S^2)-memory math kernel.
        fused = (
            (SDPBackend.CUDNN_ATTENTION, can_use_cudnn_attention),
            (SDPBackend.EFFICIENT_ATTENTION, can_use_efficient_attention),
        )
        for backend, can_use in fused:
            if can_use(params):
                self._record_fallback(SDPA_NAMES[backend], why)
                return backend
        self._record_fallback("math", why + "; no fused SDPA backend can run either")
        return SDPBackend.MATH

    def _pick_cpu(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> SDPBackend:
        """CPU has no can_use_* query: try the CPU flash kernel once per input kind, remember the answer."""
        key = (q.dtype, q.shape[-1], q.requires_grad)
        if key not in self._cpu_choice:
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    F.scaled_dot_product_attention(q[:1, :, :1], k[:1, :, :1], v[:1, :, :1], scale=scale)
                self._cpu_choice[key] = SDPBackend.FLASH_ATTENTION
            except RuntimeError as exc:
                self._record_fallback("math", f"SDPA CPU flash kernel refused {q.dtype} head_dim={q.shape[-1]}: {exc}")
                self._cpu_choice[key] = SDPBackend.MATH
        return self._cpu_choice[key]

    def _record_fallback(self, backend: str, why: str) -> None:
        if backend not in self.fallbacks:
            self.fallbacks[backend] = why
            warnings.warn(f"use_flash_attention=True but attention runs on SDPA '{backend}': {why}", stacklevel=2)


# Processors by key: ``assume_constant_result`` takes Python constants only (torch 2.11 refuses an object argument).
_PROCESSORS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count()


@torch.compiler.assume_constant_result
def _kernel_for_trace(proc_key, device_type, device_index, dtype, seq, heads, head_dim, requires_grad, scale) -> str:
    """The kernel for inputs of this kind, chosen by the eager policy on a one-sample probe while Dynamo traces.

    ``assume_constant_result`` runs this in plain Python (the CUDA can_use_* queries and the CPU flash probe need
    real tensors) and bakes the name into the graph; its arguments are the tensors' static properties, which
    Dynamo guards on, so other inputs retrace. The name is recorded as compiled: a compiled call is not counted.
    """
    device = torch.device(device_type, device_index)
    probe = torch.zeros((1, seq, heads, head_dim), dtype=dtype, device=device, requires_grad=requires_grad)
    probe = probe.transpose(1, 2)  # the strides _attend hands SDPA
    proc = _PROCESSORS[proc_key]
    name = proc._choose(probe, probe, probe, scale)
    proc.compiled_kernels.add(name)
    return name


def set_recording_processor(model: torch.nn.Module, use_flash_attention: bool = True) -> RecordingAttnProcessor:
    """Install one shared RecordingAttnProcessor on every diffusers ``Attention`` in ``model``."""
    from diffusers.models.attention_processor import Attention

    proc = RecordingAttnProcessor(use_flash_attention)
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention modules")
    for m in modules:
        m.set_processor(proc)
    return proc
