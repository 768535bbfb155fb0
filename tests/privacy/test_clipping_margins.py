"""Clipping margins through the engine (CPU): the public report, the coefficient slack per precision, the switch,
the ghost backend's bound, and scripts/gpu_check_clipping.py end to end on the tiny DiT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memory_test.kernels import norm_error
from memory_test.privacy.norm_backends import FlashNorms, GhostNorms
from tests.conftest import TinyDiT, dp_update, make_batch, make_private, rel_err

ROOT = Path(__file__).resolve().parents[2]
BF16_SLACK = 2 * 2.0**-8 + 2.0**-16


def _step(mode, *, autocast=None, C=1.0):
    torch.manual_seed(0)
    model = TinyDiT().float().train()
    dp_model, _, crit, _ = make_private(model, mode=mode, max_grad_norm=C)
    x, t, y, target = make_batch(4, dtype=torch.float32)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        pred = dp_model(x, t, y)
    crit(pred, target).backward()
    return dp_model


@pytest.mark.parametrize("mode", ["ghost", "flash_clip_bk"])
def test_fp32_on_cpu_is_exact_no_margin_no_slack(mode):
    report = _step(mode).norm_error_margin
    assert report["enabled"] and report["coefficient_slack"] == 0.0 and report["clip_factor"] == 1.0
    assert report["slack_reason"] == "exact up to IEEE rounding"
    assert report["by_path"] and all(v["u_w_max"] == v["u_b_max"] == 0.0 for v in report["by_path"].values())
    assert {"gram float32 ieee", "outer float32 ieee"} <= set(report["by_path"])
    json.dumps(report)  # records carry it as is


@pytest.mark.parametrize("mode", ["bookkeeping", "flash_clip"])
def test_bf16_autocast_gets_the_16_bit_slack(mode):
    report = _step(mode, autocast=torch.bfloat16).norm_error_margin
    assert report["coefficient_slack"] == BF16_SLACK and "bfloat16" in report["slack_reason"]
    assert any("bfloat16" in key for key in report["by_path"])


def test_slack_scales_the_norms_the_coefficients_use():
    """c = C / (f·n + 1e-6) with f = 1 + s here (exact norms on CPU): the update shrinks by 1/(1 + s)."""
    dp_model = _step("bookkeeping", autocast=torch.bfloat16, C=1e-3)
    norms = dp_model.per_sample_gradient_norms
    assert (norms > 1e-2).all()  # every sample clipped
    got = torch.cat([p.grad.flatten() for p in dp_model.parameters()])
    dp_model_off = _step_off("bookkeeping", autocast=torch.bfloat16, C=1e-3)
    ref = torch.cat([p.grad.flatten() for p in dp_model_off.parameters()])
    ratio = got.norm() / ref.norm()
    assert abs(ratio.item() * (1 + BF16_SLACK) - 1) < 3e-3  # bf16 rounding of the clipped sums aside


def _step_off(mode, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(norm_error.MARGINS_ENV, "0")
        return _step(mode, **kwargs)


@pytest.mark.parametrize("mode", ["ghost", "flash_clip_bk"])
def test_margins_off_is_the_plain_rule(mode, monkeypatch):
    """MEMORY_TEST_NORM_MARGINS=0: no slack, fp32 small-layer norms: the same update as with margins to 1e-6 (fp32
    on CPU has nothing to bound), and the report says so."""
    tiny = TinyDiT().float().train()
    batch = tuple(x.float() if x.is_floating_point() else x for x in make_batch(4))
    on = dp_update(tiny, batch, 1, 0.5, mode, "mean")
    monkeypatch.setenv(norm_error.MARGINS_ENV, "0")
    off = dp_update(tiny, batch, 1, 0.5, mode, "mean")
    assert rel_err(on, off) <= 1e-6
    report = _step(mode).norm_error_margin
    assert not report["enabled"] and report["coefficient_slack"] == 0.0 and "margins off" in report["slack_reason"]


def test_small_layers_in_float64_when_margins_on(monkeypatch):
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert GhostNorms.accumulate_dtype(x) == FlashNorms.accumulate_dtype(x) == torch.float64
    monkeypatch.setenv(norm_error.MARGINS_ENV, "0")
    assert GhostNorms.accumulate_dtype(x) == torch.float32


def test_ghost_applies_its_budget_with_the_gram_diagonals(monkeypatch):
    """cuBLAS' TF32 cannot run on a CPU: a non-exact budget stands in, and the bound must be the formula with D taken
    from the Gram matrices' diagonals (equal to the row-norm sums)."""
    budget = norm_error.ErrorBudget("gram float32 tf32", 1e-3, 5e-4)
    monkeypatch.setattr(norm_error, "torch_budget", lambda *a, **k: budget)
    A, G = torch.randn(3, 7, 5), torch.randn(3, 7, 4)
    ghost = GhostNorms()
    ghost.begin_step()
    w, b, path = ghost.linear_sq_norms(A, G, with_bias=True)
    w0 = (torch.bmm(A, A.transpose(1, 2)) * torch.bmm(G, G.transpose(1, 2))).sum(dim=(1, 2))
    b0 = G.sum(dim=1).square().sum(dim=1)
    dw, db = norm_error.incoherent_sums(A, G)
    torch.testing.assert_close(w, norm_error.incoherent_term(w0, 1e-3, dw))
    torch.testing.assert_close(b, norm_error.incoherent_term(b0, 5e-4, db))
    assert path == "gram" and ghost.margin_report()["by_path"]["gram float32 tf32"]["u_w_max"] == 1e-3
    factor = ghost.clip_factor(two_pass=True, loss_dtype=torch.float32)  # k of the largest u, once per step
    assert factor == pytest.approx(norm_error.coherent_factor(1e-3) ** 0.5)


def test_tf32_slack_counts_fp32_operands_on_tf32_gpus(monkeypatch):
    monkeypatch.setattr(norm_error, "cuda_tf32", lambda device: True)
    flash = FlashNorms()
    flash.begin_step()
    flash.linear_sq_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5), with_bias=False)
    assert flash.clip_factor(two_pass=False, loss_dtype=torch.float32) == 1 + norm_error.TF32_CONTRIBUTION_SLACK


# ----- scripts/gpu_check_clipping.py on the CPU ----------------------------------------------------------------


def _run_check(tmp_path, *extra):
    out, md = tmp_path / "clip.json", tmp_path / "clip.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check_clipping.py"), "--tiny", "--output", str(out),
           "--markdown", str(md), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600), out, md


def _numbers_only_scalars(obj) -> bool:
    """No per-sample data: no list of numbers anywhere in the record."""
    if isinstance(obj, dict):
        return all(_numbers_only_scalars(v) for v in obj.values())
    if isinstance(obj, list):
        return not any(isinstance(v, (int, float)) for v in obj) and all(_numbers_only_scalars(v) for v in obj)
    return True


def test_check_script_on_the_tiny_dit(tmp_path):
    proc, out, md = _run_check(tmp_path, "--variants", "before,after,after_rounding")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    cells = {(c["precision"], c["variant"], c["mode"]): c for c in record["cells"]}
    assert len(cells) == 3 * 2 * 4 + 2  # after_rounding: flash modes in fp32_tf32 only
    assert record["all_after_within_tolerance"]
    for (precision, variant, mode), c in cells.items():
        assert c["clipped"] >= 3 and c["samples"] == 4
        assert c["clipped_sum_rel_err"] < (1e-5 if precision != "bf16" else 1e-2)  # the reproduction is the engine's
        if variant == "after":
            assert c["max_contribution_ratio"] <= 1 + 1e-6 and c["exceeding"] == 0
            assert c["norm_error_margin"]["enabled"]
            before = cells[(precision, "before", mode)]
            assert c["max_contribution_ratio"] <= before["max_contribution_ratio"]
    assert _numbers_only_scalars(record) and "per_sample" not in out.read_text()
    assert md.read_text().strip() in proc.stdout and "| bf16 | ghost | after |" in md.read_text()


def test_check_script_deadline_and_bad_input(tmp_path):
    proc, out, md = _run_check(tmp_path, "--deadline-s", "0", "--precisions", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["cells"] and all(c["status"] == "skipped" for c in record["cells"])
    assert "skipped (deadline 0 s passed)" in md.read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    proc, out, md = _run_check(bad, "--clip-fraction", "1.5")
    assert proc.returncode == 2 and "--clip-fraction must be in (0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr and list(bad.iterdir()) == []


# ----- scripts/compare_ratio_sweeps.py --------------------------------------------------------------------------


def _record(folder: Path, experiment: str, precision: str, median_ms: float) -> None:
    from memory_test.records.record import SCHEMA_NAME

    rec = {  # a version-1 record as committed H200 folders hold them (read and upgraded by memory_test.records)
        "schema": SCHEMA_NAME, "schema_version": 1, "record_type": "run",
        "experiment": experiment, "status": "ok", "message": None,
        "config": {"experiment": experiment, "batch_size": 128, "model": "DiT-XL/2", "image_size": 256,
                   "precision": precision, "noise_multiplicity": 1, "use_flash_attention": True,
                   "private": experiment != "vanilla"},
        "env": {"device_type": "cuda", "gpu_name": "NVIDIA H200", "utc_time": "2026-01-01T00:00:00+00:00"},
        "timing": {"median_ms": median_ms, "step_times_ms": [median_ms]}, "memory": {"total_bytes": 1}, "model": {},
    }  # fmt: skip
    (folder / f"{experiment}__{precision}.json").write_text(json.dumps(rec))


def test_compare_ratio_sweeps(tmp_path):
    before, after = tmp_path / "off", tmp_path / "on"
    before.mkdir(), after.mkdir()
    for precision, vanilla_before, vanilla_after in (("fp32", 600.0, 640.0), ("bf16", 320.0, 320.0)):
        _record(before, "vanilla", precision, vanilla_before)
        _record(after, "vanilla", precision, vanilla_after)
    _record(before, "flash_clip_bk", "fp32", 660.0)  # 1.100
    _record(after, "flash_clip_bk", "fp32", 707.2)  # 1.105: vanilla drifted, the ratio barely moved
    _record(before, "ghost", "bf16", 480.0)  # 1.500
    _record(after, "ghost", "bf16", 484.8)  # 1.515: rises by 0.015
    script = [sys.executable, str(ROOT / "scripts" / "compare_ratio_sweeps.py"), "--before", str(before)]
    proc = subprocess.run(script + ["--after", str(after), "--markdown", str(tmp_path / "rise.md")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "| fp32 | flash_clip_bk | 128 | 660.0 (1.100) | 707.2 (1.105) | +0.005 | yes |" in proc.stdout
    assert "| bf16 | ghost | 128 | 480.0 (1.500) | 484.8 (1.515) | +0.015 | NO |" in proc.stdout
    assert (tmp_path / "rise.md").read_text().strip() in proc.stdout
    proc = subprocess.run(script + ["--after", str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a folder of records" in proc.stderr
