"""Self-attention processor for diffusers ``Attention`` that runs one known kernel per call and records which."""

from __future__ import annotations

import importlib
import warnings
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
        self.use_flash_attention = use_flash_attention
        self.calls: Counter[str] = Counter()
        self.fallbacks: dict[str, str] = {}
        self._flash_attn, self._flash_attn_reason = _load_flash_attn() if use_flash_attention else (None, "")
        self._cpu_choice: dict[tuple, SDPBackend] = {}

    @property
    def backends_used(self) -> set[str]:
        return set(self.calls)

    @property
    def backend(self) -> str:
        """The kernel that ran: one name, "mixed:a+b" if several, "none" before the first call."""
        used = sorted(self.calls)
        if not used:
            return "none"
        return used[0] if len(used) == 1 else "mixed:" + "+".join(used)

    def reset(self) -> None:
        self.calls.clear()
        self.fallbacks.clear()
        self._cpu_choice.clear()

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
        if self._flash_attn_ok(q):
            self.calls["flash_attn"] += 1
            return self._flash_attn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        backend = self._pick_sdpa(q, k, v, scale)
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)
        self.calls[SDPA_NAMES[backend]] += 1
        return out.transpose(1, 2)

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
