"""Book-keeping DP-SGD on FSDP2: rank-local norms, clipped gradients reduce-scattered into the parameter shards.

Data flow of one step on W ranks (each rank holds B/W samples of the global batch):

1. Forward/backward are FSDP2's own: a unit all-gathers its parameters before its forward/backward and frees
   them after. The recording backward reaches no parameter, so FSDP2 has no gradient to reduce.
2. Per-sample norms and clipping coefficients are computed on the rank that holds the sample; norms of
   different samples are never combined across ranks.
3. ``write_clipped_grads``: per layer, the full-shape local sum S_r = Σ_{i on r} c_i g_i is formed from the
   rank's cached (A, G) (shapes only: no parameter values, so no all-gather), then reduce-scattered (sum) into
   the parameter's own DTensor layout. Reduce-scatter rather than all-reduce + slicing: half the bytes on the
   wire ((W-1)/W·|p| instead of 2(W-1)/W·|p|) and each rank keeps only its shard; the transient full-shape
   buffer is the same either way (one layer at a time).
4. Opacus' ``FSDPOptimizerFastGradientClipping`` then adds noise: each rank draws a full-shape normal tensor
   (a transient of one parameter's full size) and, through DTensor's implicit replication, adds only the slice
   of it that matches its own shard, so every coordinate of the full parameter is noised exactly once in total.
   For ``loss_reduction="mean"`` it divides the noise by W and the gradient by the per-worker expected batch
   B/W (Opacus' convention); we therefore store S/W in the shard, and the update is
   (Σ_global c_i g_i + N(0, σ²C²)) / B. For ``"sum"`` nothing is divided: S + N(0, σ²C²).
5. Accounting: Opacus' distributed DPDataLoader samples each rank's partition with the global rate q =
   1/len(loader) (pass a loader whose batch_size is the *global* batch), and the accountant records q.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial

from .errors import LayoutError, PrivacyConfigError
from .grad_sample_module import DPGradSampleModule

# Names of the nn.ModuleList holding transformer blocks: each block becomes its own FSDP2 unit.
BLOCK_CONTAINERS = ("transformer_blocks", "blocks")
# diffusers' DiT calls block 0's conditioning embedder again from the output head, outside block 0's forward:
# it must be its own unit so that FSDP2 unshards it for that second call (and its backward).
REUSED_OUTSIDE_BLOCK = ("0.norm1.emb",)


def dit_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a DiT (diffusers or wrapped), in order."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS:
            blocks.extend(module)
    return blocks


def shard_dit(
    model: nn.Module,
    *,
    mesh=None,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 ``fully_shard`` on each DiT block (and block 0's reused embedder), then on the root; in place.

    Call after ``torch.distributed.init_process_group`` and after moving the model to its device, and before
    building the optimizer (it must see the sharded parameters) and before ``make_private``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise PrivacyConfigError("shard_dit needs torch.distributed initialised: launch with torchrun")
    blocks = dit_blocks(model)
    if not blocks:
        raise PrivacyConfigError(
            f"no transformer blocks found in {type(model).__name__} (an nn.ModuleList named one of "
            f"{BLOCK_CONTAINERS}): shard this model with torch.distributed.fsdp.fully_shard yourself"
        )
    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy(), "reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    for index, block in enumerate(blocks):
        for name, sub in block.named_modules():
            if f"{index}.{name}" in REUSED_OUTSIDE_BLOCK:
                fully_shard(sub, **kwargs)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _unsharded_trainable(m: nn.Module) -> list[str]:
    return [name for name, p in m.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]


def _sharded_only(p: DTensor) -> bool:
    return all(placement.is_shard() for placement in p.placements)


class FSDPDPGradSampleModule(DPGradSampleModule):
    """DPGradSampleModule for an FSDP2-sharded model: book-keeping with clipped gradients reduce-scattered."""

    def __init__(self, m: nn.Module, **kwargs):
        if not isinstance(m, FSDPModule):
            raise PrivacyConfigError(
                "sharded DP modes need the model sharded with FSDP2 first: call "
                "memory_test.privacy.fsdp.shard_dit(model) (or fully_shard on each block and the root) before "
                "building the optimizer and calling make_private"
            )
        plain = _unsharded_trainable(m)
        if plain:  # their gradients would stay rank-local: a silently wrong (and less private) update
            raise PrivacyConfigError(f"trainable parameters not managed by FSDP2: {', '.join(plain[:5])}")
        replicated = [n for n, p in m.named_parameters() if isinstance(p, DTensor) and not _sharded_only(p)]
        if replicated:  # replicas (HSDP) would each add their own noise to the same coordinates and diverge
            raise PrivacyConfigError(
                f"parameters replicated over a mesh dimension (HSDP?): {', '.join(replicated[:5])}; sharded DP "
                "modes support plain FSDP2 sharding over one mesh dimension"
            )
        if not kwargs.get("keep_for_bookkeeping", False):
            raise PrivacyConfigError("sharded modes implement the book-keeping strategy only")
        super().__init__(m, **kwargs)
        self.world_size = dist.get_world_size()
        self._layout_done_everywhere = False

    def _run_layout_check(self, args, kwargs, rows: int) -> None:
        """Every rank runs the check's probe forwards (each all-gathers) until every rank has verified its layers,
        and a layout error on any rank stops all of them."""
        if self._layout_done_everywhere:
            return
        if not self._any_rank(self._layout.pending):
            self._layout_done_everywhere = True
            return
        error = None
        try:
            self._layout.run(self, args, kwargs, rows, always_forward=True)
        except LayoutError as exc:
            error = exc
        if self._any_rank(error is not None):
            raise error or LayoutError("the engine's layout check failed on another rank (its error says why)")

    def _any_rank(self, flag: bool) -> bool:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def record_norms(self, loss_per_sample: torch.Tensor, *, retain_graph: bool) -> torch.Tensor:
        """As the base; an empty local batch still runs the backward, because FSDP2's backward all-gathers."""
        if loss_per_sample.shape[0] == 0 and loss_per_sample.requires_grad:
            # Taps pass gradients through untouched (not recording): no norms, but every unit's collectives run.
            torch.autograd.grad(loss_per_sample.sum(), self._anchor, retain_graph=retain_graph, allow_unused=True)
        return super().record_norms(loss_per_sample, retain_graph=retain_graph)

    def write_clipped_grads(self, coef: torch.Tensor):
        """p.grad (a shard) += (Σ over the global batch of c_i g_i)[shard], divided by W for a mean loss."""
        scale = 1.0 / self.world_size if self.loss_reduction == "mean" else 1.0
        for state in self._states:
            uses = [u for u in state.uses if u.grad_output is not None]
            full = state.rule.clipped_grads(state.module, uses, self._n, coef) if uses else {}
            # Every rank issues the same reduce-scatters in the same order, zeros where it has nothing to add.
            for p in state.params():
                g = full.get(p)
                if g is None:
                    g = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                self._accumulate_shard(p, g, scale)
            self._release(state)

    @staticmethod
    def _accumulate_shard(p: torch.Tensor, full: torch.Tensor, scale: float) -> None:
        if not isinstance(p, DTensor):
            raise PrivacyConfigError(f"parameter of shape {tuple(p.shape)} is not sharded by FSDP2")
        mesh = p.device_mesh
        partial = DTensor.from_local(full.to(p.dtype), mesh, [Partial("sum")] * mesh.ndim, run_check=False)
        shard = partial.redistribute(mesh, p.placements)  # reduce-scatter into FSDP2's own layout
        if scale != 1.0:
            shard = shard * scale
        p.grad = shard if p.grad is None else p.grad + shard
