"""ghost_fsdp_bk on 2 CPU processes (gloo, FSDP2): the sharded update equals the single-process reference.

pytest launches this very file under ``torch.distributed.run``; each check runs on both ranks and rank 0 writes
the measured numbers to a JSON file that the tests below assert on.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from memory_test.privacy import PrivacyConfigError, PrivacyEngine
from memory_test.privacy.reference import clipped_sum, per_sample_gradients, per_sample_norms
from tests.conftest import TinyDiT, make_batch, per_sample_criterion, reference_update, rel_err

ROOT = Path(__file__).resolve().parents[2]
N = 4  # global batch
SHARDED_MODES = ("ghost_fsdp_bk", "flash_fsdp_bk")  # float64 flash norms take the kernels' torch path
# (name, loss reduction, noise multiplicity K, samples on rank 0 and rank 1)
EXACT_CASES = [
    ("mean_even", "mean", 1, (2, 2)),
    ("sum_uneven_k2", "sum", 2, (3, 1)),
]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _make_private(model, *, dataset_size, batch_size, mode="ghost_fsdp_bk", **kwargs):
    kwargs = {"noise_multiplier": 0.0, "max_grad_norm": 1.0, "poisson_sampling": False, **kwargs}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(dataset_size)), batch_size=batch_size)
    engine = PrivacyEngine()
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, grad_sample_mode=mode, **kwargs)
    return engine, *out


def _exact_case(base, mode, reduction, k, split) -> dict:
    from memory_test.privacy.fsdp import shard_dit

    rank = dist.get_rank()
    batch = make_batch(N, k=k)
    _, norms = reference_update(base, batch, N, k, 1e9, reduction)
    max_grad_norm = norms.median().item()  # some samples clipped, some not
    want, _ = reference_update(base, batch, N, k, max_grad_norm, reduction)
    model = shard_dit(copy.deepcopy(base))
    before = [_full(p.detach()).clone() for p in model.parameters()]
    _, dp_model, dp_opt, crit, _ = _make_private(
        model,
        dataset_size=N,
        batch_size=N,
        mode=mode,
        criterion=per_sample_criterion(k, reduction),
        max_grad_norm=max_grad_norm,
        loss_reduction=reduction,
    )
    lo = sum(split[:rank]) * k
    rows = slice(lo, lo + split[rank] * k)  # this rank's samples (all K rows of each)
    x, t, y, target = (v[rows] for v in batch)
    crit(dp_model(x, t, y), target).backward()
    dp_opt.step()
    got = [b - _full(p.detach()) for b, p in zip(before, model.parameters())]
    clipped = bool((norms > max_grad_norm * 1.01).any() and (norms < max_grad_norm * 0.99).any())
    return {"rel_err": rel_err(got, want), "some_clipped": clipped}


def _vanilla_case(base) -> float:
    """Plain data-parallel FSDP2 (the non-private baseline): gradient equals the single-process mean gradient."""
    from memory_test.privacy.fsdp import shard_dit

    rank, world = dist.get_rank(), dist.get_world_size()
    x, t, y, target = make_batch(N, seed=5)
    ref = copy.deepcopy(base)
    want = torch.autograd.grad((ref(x, t, y) - target).pow(2).mean(), list(ref.parameters()))
    model = shard_dit(copy.deepcopy(base))
    per = N // world
    rows = slice(rank * per, (rank + 1) * per)
    (model(x[rows], t[rows], y[rows]) - target[rows]).pow(2).mean().backward()  # FSDP2 averages over ranks
    return rel_err([_full(p.grad) for p in model.parameters()], want)


def _linear_stack(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48, bias=False), nn.Linear(48, 40, bias=False))
    for layer in model:
        fully_shard(layer)
    return fully_shard(model)


def _empty_rank_case() -> float:
    """Rank 1 gets no sample (possible under Poisson sampling): it still joins every collective, adds nothing.

    A Linear stack, because diffusers' attention cannot reshape an empty batch.
    """
    rank = dist.get_rank()
    torch.manual_seed(2)
    x, target = torch.randn(N, 6, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    crit = per_sample_criterion(1, "mean")
    grads = per_sample_gradients(base, lambda i: crit(base(x[i : i + 1]), target[i : i + 1])[0], N)
    max_grad_norm = per_sample_norms(grads).median().item()
    want = [u / N for u in clipped_sum(grads, max_grad_norm)]
    model = copy.deepcopy(base)
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    before = [_full(p.detach()).clone() for p in model.parameters()]
    _, dp_model, dp_opt, dp_crit, _ = _make_private(
        model, dataset_size=N, batch_size=N, criterion=crit, max_grad_norm=max_grad_norm
    )
    rows = slice(0, N) if rank == 0 else slice(0, 0)
    dp_crit(dp_model(x[rows]), target[rows]).backward()
    dp_opt.step()
    return rel_err([b - _full(p.detach()) for b, p in zip(before, model.parameters())], want)


def _noise_case() -> dict:
    """Zero data: p.grad after noise and scaling is pure noise; its std on the full parameter is σC/B_global."""
    sigma, c, n_global = 2.0, 0.5, 8
    world = dist.get_world_size()
    torch.manual_seed(0)  # the same seed on every rank, as in a typical torchrun script
    model = _linear_stack(0)
    _, dp_model, dp_opt, crit, _ = _make_private(
        model,
        dataset_size=n_global,
        batch_size=n_global,
        criterion=per_sample_criterion(1, "mean"),
        noise_multiplier=sigma,
        max_grad_norm=c,
    )
    local = n_global // world
    crit(dp_model(torch.zeros(local, 64)), torch.zeros(local, 40)).backward()
    dp_opt.pre_step()  # noise and scaling, no SGD step
    noise = torch.cat([_full(p.grad).flatten() for p in model.parameters()])
    return {"std": noise.std().item(), "expected": sigma * c / n_global, "numel": noise.numel()}


def _accounting_case() -> dict:
    """Poisson sampling per rank at the global rate; the accountant records the global rate."""
    sigma, dataset_size, batch_size = 1.0, 64, 16
    model = _linear_stack(1)
    engine, dp_model, dp_opt, crit, loader = _make_private(
        model,
        dataset_size=dataset_size,
        batch_size=batch_size,
        criterion=per_sample_criterion(1, "mean"),
        noise_multiplier=sigma,
        poisson_sampling=True,
    )
    (xb,) = next(iter(loader))
    crit(dp_model(torch.randn(len(xb), 64)), torch.randn(len(xb), 40)).backward()
    dp_opt.step()
    noise_multiplier, sample_rate, steps = engine.accountant.history[-1]
    return {
        "loader_sample_rate": loader.batch_sampler.sample_rate,
        "sampler": type(loader.batch_sampler).__name__,
        "accountant_sample_rate": sample_rate,
        "accountant_steps": steps,
        "optimizer_expected_batch": dp_opt.expected_batch_size,
        "global_rate": batch_size / dataset_size,
    }


def _plain_backward_case() -> dict:
    """loss.backward() on a loss not made by the DP criterion: FSDP2 reduce-scatters an unclipped gradient into the
    shards and runs the sharded parameters' post-accumulate-grad hooks, which the engine registered; the step must
    be refused, alone or before a DP backward, and a normal step must work after zero_grad."""
    from memory_test.privacy import CoverageError

    out = {}
    for name, also_dp in (("alone", False), ("before_dp", True)):
        model = _linear_stack(3)
        engine, dp_model, dp_opt, crit, _ = _make_private(
            model, dataset_size=8, batch_size=8, criterion=per_sample_criterion(1, "mean")
        )
        x, y = torch.randn(4, 64), torch.randn(4, 40)
        per_sample_criterion(1, "mean")(dp_model(x), y).mean().backward()
        if also_dp:
            crit(dp_model(x), y).backward()
        before = [_full(p.detach()).clone() for p in model.parameters()]
        try:
            dp_opt.step()
            out[name] = "stepped"
        except CoverageError as e:
            out[name] = "refused" if "outside the DP criterion" in str(e) else str(e)
        unchanged = all(torch.equal(b, _full(p.detach())) for b, p in zip(before, model.parameters()))
        dp_opt.zero_grad()
        crit(dp_model(x), y).backward()
        dp_opt.step()
        out[name] += f", unchanged={unchanged}, then {len(engine.accountant.history)} step(s) accounted"
    return out


def _unsharded_model_error() -> str:
    try:
        _make_private(nn.Linear(3, 2), dataset_size=4, batch_size=4, criterion=per_sample_criterion(1, "mean"))
    except PrivacyConfigError as e:
        return str(e)
    return ""


def _worker(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    base = TinyDiT().double().train()
    results = {
        f"{mode}/{name}": _exact_case(base, mode, red, k, split)
        for mode in SHARDED_MODES
        for name, red, k, split in EXACT_CASES
    }
    results["vanilla_rel_err"] = _vanilla_case(base)
    results["empty_rank_rel_err"] = _empty_rank_case()
    results["noise"] = _noise_case()
    results["accounting"] = _accounting_case()
    results["unsharded_error"] = _unsharded_model_error()
    results["plain_backward"] = _plain_backward_case()
    results["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "tests.privacy.test_fsdp_bookkeeping", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", [c[0] for c in EXACT_CASES])
@pytest.mark.parametrize("mode", SHARDED_MODES)
def test_sharded_update_matches_single_processreference_update(results, mode, case):
    case = f"{mode}/{case}"
    assert results["world_size"] == 2
    assert results[case]["some_clipped"]
    assert results[case]["rel_err"] <= 1e-6, results[case]


def test_a_rank_without_samples_still_gives_the_exact_update(results):
    assert results["empty_rank_rel_err"] <= 1e-6


def test_vanilla_fsdp2_baseline_matches_full_batch_gradient(results):
    assert results["vanilla_rel_err"] <= 1e-9


def test_noise_added_once_in_total(results):
    noise = results["noise"]
    # ~5000 draws: within 5% of the truth with overwhelming probability; sqrt(2) larger would mean noise per rank.
    assert abs(noise["std"] / noise["expected"] - 1) < 0.05, noise


def test_accountant_sees_the_global_sampling_rate(results):
    acc = results["accounting"]
    assert acc["sampler"] == "DistributedUniformWithReplacementSampler"
    assert acc["loader_sample_rate"] == acc["accountant_sample_rate"] == acc["global_rate"]
    assert acc["accountant_steps"] == 1
    assert acc["optimizer_expected_batch"] == 16 / 2  # Opacus: per worker; noise is divided by W to match


def test_plain_backward_outside_the_criterion_is_refused_under_fsdp(results):
    want = "refused, unchanged=True, then 1 step(s) accounted"
    assert results["plain_backward"] == {"alone": want, "before_dp": want}


def test_unsharded_model_is_a_clear_error(results):
    assert "shard_dit" in results["unsharded_error"]


def test_sharded_mode_in_a_one_process_group_is_a_clear_error(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(PrivacyConfigError, match="world size is 1"):
            _make_private(nn.Linear(3, 2), dataset_size=4, batch_size=4, criterion=per_sample_criterion(1, "mean"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
