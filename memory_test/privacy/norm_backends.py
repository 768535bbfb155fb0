"""Norm algorithms for Linear-like layers: ghost (torch Gram matrices) and flash (fused kernels).

Wherever the arithmetic is not exact up to IEEE rounding (TF32 operands, tensor-core accumulation), both return each
squared norm plus its bound's data-dependent term u·D (``memory_test.kernels.norm_error``: added on the Gram
diagonals, in the kernels at no cost), and keep a per-step ledger of the error budgets applied and the operand
precisions seen. ``clip_factor`` turns the ledger into the factor the engine multiplies the norms by before
clipping: sqrt(k(largest u)) for the error aligned with the data, times (1 + s) for rounding after the norms.
``margin_report`` is what the engine exposes as ``norm_error_margin``. ``MEMORY_TEST_NORM_MARGINS=0``: plain
estimates and factor 1 (A/B checks only).
"""

from __future__ import annotations

import contextlib
import math

import torch

from memory_test.kernels import norm_error

from .modes import FLASH, GHOST

RULE = (
    "c_i = C / (f * n_i + 1e-6), n_i = sqrt(sum over layers of (w_i + u * D_i)), f = (1 + s) * sqrt(k(u_max)), "
    "k(u) = (1+u)/(1-u)^2; w_i the computed squared norm, D_i = sum_t |A_t|^2 |G_t|^2, u the layer's error budget, "
    "s the coefficient slack (memory_test/kernels/norm_error.py)"
)
SMALL_LAYER_NOTE = "embedding and materialized norms in float64 (exact: no margin)"
_tracing = torch.compiler.is_dynamo_compiling


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Linear norms accumulate in fp32 even under bf16/fp16 autocast; float64 stays float64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def small_layer_dtype(x: torch.Tensor) -> torch.dtype:
    """Where the embedding and materialized rules form their norms: float64, exact (their tensors are small), so
    those paths need no margin; with margins off, as before (fp32, or float64 for float64 inputs)."""
    return torch.float64 if norm_error.margins_enabled() else accumulate_dtype(x)


def _factor_parts(factor: float, k: float, s: float, reason: str) -> dict:
    return {"clip_factor": factor, "coherent_factor": k, "coefficient_slack": s, "slack_reason": reason}


class _MarginLedger:
    """Per step: the budgets applied per path and precision, and the operand precisions the Linear norms saw."""

    _recorder: list | None = None  # set while ``recording``
    noted = 0  # notes made so far (a program tells from it whether its graph ran or Python did)

    def begin_step(self) -> None:
        self.margins = norm_error.margins_enabled()  # read once per step: the environment lookup is not free
        self._budgets: dict[str, dict] = {}
        self._u_max = 0.0
        self._dtypes: set = set()
        self._tf32 = False
        self._factor = _factor_parts(1.0, 1.0, 0.0, "no step yet")

    def _ledger(self) -> None:
        if not hasattr(self, "_budgets"):
            self.begin_step()

    def _note(self, budget: norm_error.ErrorBudget, A: torch.Tensor, G: torch.Tensor) -> None:
        if _tracing():  # a traced program's notes were recorded by its eager first call and are replayed
            return
        self._ledger()
        self.noted += 1
        note = (budget, A.dtype, G.dtype, torch.float32 in (A.dtype, G.dtype) and norm_error.cuda_tf32(A.device))
        self.replay((note,))
        if self._recorder is not None:
            self._recorder.append(note)

    @contextlib.contextmanager
    def recording(self):
        """Collect the notes made inside the block (and apply them as usual): ``replay`` applies them again."""
        self._ledger()
        self._recorder, notes = [], []
        try:
            yield notes
        finally:
            notes += self._recorder
            self._recorder = None

    def replay(self, notes) -> None:
        """Apply notes recorded by ``recording`` (what a traced program's norms would have noted)."""
        for budget, a_dtype, g_dtype, tf32 in notes:
            entry = self._budgets.setdefault(budget.key, {"u_w_max": 0.0, "u_b_max": 0.0, "calls": 0})
            entry["u_w_max"] = max(entry["u_w_max"], budget.u_w)
            entry["u_b_max"] = max(entry["u_b_max"], budget.u_b)
            entry["calls"] += 1
            self._u_max = max(self._u_max, budget.u_w, budget.u_b)
            self._dtypes.update((a_dtype, g_dtype))
            self._tf32 = self._tf32 or tf32

    def clip_factor(self, *, two_pass: bool, loss_dtype: torch.dtype) -> float:
        """f for this step: the engine clips with f·n (1.0 with margins off; see the module doc)."""
        self._ledger()
        if not self.margins:
            self._factor = _factor_parts(1.0, 1.0, 0.0, f"margins off ({norm_error.MARGINS_ENV}=0)")
            return 1.0
        s, reason = norm_error.coefficient_slack(
            two_pass=two_pass, dtypes=self._dtypes, tf32=self._tf32, loss_dtype=loss_dtype
        )
        k = norm_error.coherent_factor(self._u_max)
        factor = (1.0 + s) * math.sqrt(k)
        self._factor = _factor_parts(factor, k, s, reason)
        return factor

    def margin_report(self) -> dict:
        """JSON-safe: the rule, the factor and its parts, and the budgets applied in the last step (path and precision
        -> largest u)."""
        self._ledger()
        enabled = self.margins
        return {
            "enabled": enabled,
            "rule": RULE if enabled else "c_i = C / (n_i + 1e-6) with the computed norms (no margin)",
            **self._factor,
            "u_max": self._u_max,
            "by_path": {key: dict(v) for key, v in sorted(self._budgets.items())},
            "small_layers": SMALL_LAYER_NOTE if enabled else "embedding and materialized norms in fp32",
        }


class GhostNorms(_MarginLedger):
    """Opacus-style ghost norms: ||A_iᵀG_i||² = <A_iA_iᵀ, G_iG_iᵀ>, two B x T x T Gram matrices in memory."""

    name = GHOST
    accumulate_dtype = staticmethod(small_layer_dtype)

    def kernel_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        return "torch"

    def predict_path(self, rows: int, d: int, p: int, dtype: torch.dtype = torch.float32) -> str:
        return "outer" if rows == 1 else "gram"

    def linear_sq_norms(self, A: torch.Tensor, G: torch.Tensor, *, with_bias: bool):
        dtype = accumulate_dtype(G)
        A32, G32 = A.to(dtype), G.to(dtype)
        if A.shape[1] == 1:  # one row per sample: the gradient is an outer product, the bias gradient G itself
            g_sq = G32.square().sum(dim=(1, 2))
            self._note(norm_error.exact_budget("outer", A.dtype, G.dtype), A, G)  # elementwise: IEEE
            return A32.square().sum(dim=(1, 2)) * g_sq, (g_sq if with_bias else None), "outer"
        ggT = torch.bmm(G32, G32.transpose(1, 2))
        aaT = torch.bmm(A32, A32.transpose(1, 2))
        budget = norm_error.torch_budget("gram", A, G, dtype)
        self._note(budget, A, G)
        bound = self.margins and not budget.exact
        if bound:  # + u_w·D: the product's diagonal terms ||A_t||²·||G_t||² scaled by (1 + u_w), in place
            aaT.diagonal(dim1=1, dim2=2).mul_(1.0 + budget.u_w)
        w_sq = (aaT * ggT).sum(dim=(1, 2))
        b_sq = None
        if with_bias:
            if bound:
                ggT.diagonal(dim1=1, dim2=2).mul_(1.0 + budget.u_b)
            # ||Σ_t g_t||² is the sum of every entry of G Gᵀ, already in memory.
            b_sq = ggT.sum(dim=(1, 2))
        return w_sq, b_sq, "gram"

    def multi_linear_sq_norms(self, A, Gs, *, with_bias):
        """One layer at a time, as Opacus does: ghost is the unfused baseline."""
        return [self.linear_sq_norms(A, G, with_bias=b) for G, b in zip(Gs, with_bias)]


class FlashNorms(_MarginLedger):
    """Fused per-sample norm kernels (memory_test.kernels): Gram or direct path chosen per layer by cost."""

    name = FLASH
    accumulate_dtype = staticmethod(small_layer_dtype)

    def __init__(self):
        from memory_test.kernels import flash_norms  # imported lazily: triton is only needed by flash modes

        self._kernels = flash_norms

    def kernel_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        return self._kernels.kernel_backend(device, dtype)

    def predict_path(self, rows: int, d: int, p: int, dtype: torch.dtype = torch.float32) -> str:
        return self._kernels.choose_path(rows, d, p, dtype)

    def linear_sq_norms(self, A: torch.Tensor, G: torch.Tensor, *, with_bias: bool):
        self._ledger()
        if not self.margins:
            return self._kernels.linear_sq_norms(A, G, with_bias=with_bias)
        w_sq, b_sq, path, budget = self._kernels.linear_sq_norm_bounds(A, G, with_bias=with_bias)
        self._note(budget, A, G)
        return w_sq, b_sq, path

    def multi_linear_sq_norms(self, A, Gs, *, with_bias):
        self._ledger()
        if not self.margins:
            return self._kernels.multi_linear_sq_norms(A, Gs, with_bias=with_bias)
        out = []
        bounds = self._kernels.multi_linear_sq_norm_bounds(A, Gs, with_bias=with_bias)
        for G, (w_sq, b_sq, path, budget) in zip(Gs, bounds):
            self._note(budget, A, G)
            out.append((w_sq, b_sq, path))
        return out


NORM_BACKENDS = {GHOST: GhostNorms, FLASH: FlashNorms}
