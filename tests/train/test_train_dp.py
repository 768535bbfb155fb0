"""memory_test.train end to end on CPU: digit images -> tiny VAE latents -> DP training of DiT-tiny, ledger, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from memory_test.cli_common.errors import ToolError
from memory_test.diffusion import latent_dataset as ld
from memory_test.diffusion.vae import fit_scaling_factor, load_vae
from memory_test.privacy.errors import PrivacyConfigError
from memory_test.train import args as train_args
from memory_test.train import checkpoint
from memory_test.train import run as train_dp

MODE = "flash_bk"
N_IMAGES = 1000
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """1000 real 8x8 digits (sklearn), 10 classes, resized to 64 px and encoded by a tiny VAE to 4x8x8 latents.

    The VAE is randomly initialised (no weights can be downloaded here) but fixed, so the latents are a fixed
    nonlinear encoding of real images; its scaling factor is fitted to unit variance, as SD's 0.18215 was.
    """
    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images[:N_IMAGES], d.target[:N_IMAGES], strict=True)):
        (root / "images" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype("uint8")).save(root / "images" / str(y) / f"{i:04d}.png")
    torch.manual_seed(0)
    vae = load_vae(config="tiny", allow_random_init=True)
    files = ld.list_image_folder(root / "images")[0][:256]
    vae.register_to_config(scaling_factor=fit_scaling_factor(vae, torch.stack([ld.load_image(f, 64) for f in files])))
    return ld.precompute_latents(
        root / "images", root / "latents.safetensors", vae, 64, batch_size=250, sample=False, progress=False
    )


def _args(latents, tmp, *extra):
    base = [
        "--latents",
        str(latents),
        "--model",
        "DiT-tiny",
        "--mode",
        MODE,
        "--lr",
        "3e-3",
        "--delta",
        "1e-4",
        "--no-progress",
        "--probe-size",
        "200",
        "--max-grad-norm",
        "1.0",
    ]
    return base + [str(e) for e in extra]


def _run(argv):
    return train_dp.train(train_args.parse_args(argv), argv)


def _prv_epsilon(sigma, q, steps, delta):
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta)


def test_dp_training_learns_and_reports_opacus_epsilon(latents, tmp_path, capsys):
    # N=1000, expected batch 50: q = 1/20, 20 steps per epoch, 15 epochs = 300 DP steps; K=2 noise draws per image.
    s = _run(
        _args(
            latents,
            tmp_path,
            "--batch-size",
            50,
            "--physical-batch-size",
            64,
            "--epochs",
            15,
            "--noise-multiplier",
            1.0,
            "--noise-multiplicity",
            2,
            "--metrics-out",
            tmp_path / "m.json",
        )
    )
    out = capsys.readouterr().out
    hist = s["history"]
    start, end = hist[0]["probe_loss"], hist[-1]["probe_loss"]
    print(f"[{MODE}] probe loss {start:.4f} -> {end:.4f}, ε={s['epsilon']:.4f}")
    assert end < 0.6 * start, (start, end)
    # The ledger is Opacus' own accounting of the mechanism that ran: σ=1, q=1/ceil(N/B), one entry per step.
    q = 1 / math.ceil(N_IMAGES / 50)
    assert s["steps"] == 300 and s["accountant_history"] == [[1.0, q, 300]]
    assert s["epsilon"] == pytest.approx(_prv_epsilon(1.0, q, 300, 1e-4), rel=1e-9)
    for rec in hist[1:]:
        assert rec["epsilon"] == pytest.approx(_prv_epsilon(1.0, q, rec["step"], 1e-4), rel=1e-9)
    assert json.loads((tmp_path / "m.json").read_text())["epsilon"] == s["epsilon"]
    assert f"final privacy: (ε, δ) = ({s['epsilon']:.4f}, 0.0001)" in out


def test_target_epsilon_sets_sigma_from_opacus(latents, tmp_path):
    s = _run(
        _args(
            latents,
            tmp_path,
            "--batch-size",
            100,
            "--physical-batch-size",
            64,
            "--epochs",
            2,
            "--target-epsilon",
            4.0,
            "--probe-size",
            0,
        )
    )
    q = 1 / math.ceil(N_IMAGES / 100)
    sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-4, sample_rate=q, epochs=2, accountant="prv")
    assert s["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    assert 3.9 < s["epsilon"] <= 4.0 + 1e-9


RESUME = (
    "--batch-size",
    100,
    "--physical-batch-size",
    32,
    "--epochs",
    3,
    "--noise-multiplier",
    1.2,
    "--noise-multiplicity",
    2,
    "--probe-size",
    50,
)


@pytest.fixture(scope="module")
def uninterrupted(latents, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    summary = _run(_args(latents, tmp, *RESUME, "--checkpoint", tmp / "ckpt.pt"))
    return summary, checkpoint.load_checkpoint(tmp / "ckpt.pt")


def _assert_same_run(a, a_ckpt, b, b_ckpt):
    assert a["accountant_history"] == b["accountant_history"] == [[1.2, 0.1, 30]]
    assert a["epsilon"] == b["epsilon"]
    assert a_ckpt["accountant"]["history"] == b_ckpt["accountant"]["history"]
    assert [h["epsilon"] for h in a["history"]] == [h["epsilon"] for h in b["history"]]
    # Same batches, (t, ε), label dropout and DP noise after the resume: bitwise the same model.
    for k, v in a_ckpt["model"].items():
        assert torch.equal(v, b_ckpt["model"][k]), k


def test_stop_and_resume_gives_the_same_ledger_and_model(latents, tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt.pt"
    part = _run(_args(latents, tmp_path, *RESUME, "--checkpoint", ckpt, "--max-steps", 13))  # mid-epoch 2
    assert not part["finished"] and part["accountant_history"] == [[1.2, 0.1, 13]]
    assert checkpoint.load_checkpoint(ckpt)["progress"] == {"epoch": 1, "step_in_epoch": 3, "global_step": 13}
    done = _run(_args(latents, tmp_path, *RESUME, "--checkpoint", ckpt, "--resume"))
    _assert_same_run(*uninterrupted, done, checkpoint.load_checkpoint(ckpt))


def test_sigkill_then_resume_gives_the_same_ledger_and_model(latents, tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt.pt"
    argv = _args(latents, tmp_path, *RESUME, "--checkpoint", ckpt, "--checkpoint-every", 4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "memory_test.diffusion_profile.train_dp", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600  # generous: a loaded 2-core machine can be 20x slower
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.load_checkpoint(ckpt)["progress"]["global_step"]
    assert 0 < killed_at < 30
    done = _run(_args(latents, tmp_path, *RESUME, "--checkpoint", ckpt, "--checkpoint-every", 4, "--resume"))
    _assert_same_run(*uninterrupted, done, checkpoint.load_checkpoint(ckpt))


def test_resume_refuses_changed_privacy_settings(latents, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _run(_args(latents, tmp_path, *RESUME, "--checkpoint", ckpt, "--max-steps", 2))
    changed = [a if a != 1.2 else 2.0 for a in RESUME]
    with pytest.raises(ToolError, match="noise_multiplier: 1.2 -> 2.0"):
        _run(_args(latents, tmp_path, *changed, "--checkpoint", ckpt, "--resume"))


def test_rgb_data_and_bad_delta_are_refused(latents, tmp_path):
    rgb = tmp_path / "rgb.safetensors"
    meta = {"format": ld.FORMAT, "fingerprint": "x", "classes": '["a"]', "image_size": "64"}
    save_file({"latents": torch.rand(20, 3, 64, 64), "labels": torch.zeros(20, dtype=torch.long)}, str(rgb), meta)
    with pytest.raises(ToolError, match="look like RGB images: encode them first"):
        _run(["--latents", str(rgb), "--mode", MODE, "--noise-multiplier", "1", "--delta", "1e-3"])
    with pytest.raises(ToolError, match=r"must be in \(0, 1/N\)"):
        _run(["--latents", str(latents), "--mode", MODE, "--noise-multiplier", "1", "--delta", "0.01"])


def test_multi_gpu_mode_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PrivacyConfigError, match="torchrun --nproc-per-node=<num GPUs> -m memory_test"):
        train_args.check_launch("ghost_fsdp_bk", ["--mode", "ghost_fsdp_bk"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_args.check_launch("ghost_fsdp_bk")  # launched as it should be


def test_sharded_modes_are_refused_by_train_dp(latents, capsys):
    assert train_dp.main(["--latents", str(latents), "--mode", "flash_fsdp_bk", "--noise-multiplier", "1"]) == 2
    assert "trains single-device modes only" in capsys.readouterr().err


def test_single_process_mode_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrivacyConfigError, match="not torchrun"):
        train_args.check_launch("bookkeeping")


class _Gain(torch.nn.Module):
    """A trainable layer type the engine has no per-sample rule for."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.gain


def test_unsupported_layer_error_reaches_the_user(latents, tmp_path, monkeypatch, capsys):
    real_build = train_dp.build_model

    class WithGain(torch.nn.Module):
        def __init__(self, args, ds):
            super().__init__()
            self.dit, self.out = real_build(args, ds), _Gain()

        def forward(self, x, t, y):
            return self.out(self.dit(x, t, y))

    monkeypatch.setattr(train_dp, "build_model", WithGain)
    code = train_dp.main(_args(latents, tmp_path, "--batch-size", 100, "--noise-multiplier", 1.0, "--max-steps", 1))
    err = capsys.readouterr().err
    assert code == 2 and "no exact per-sample clipping rule: out (_Gain)" in err and "Traceback" not in err


def test_hooks_mode_rejects_noise_multiplicity(latents, tmp_path):
    # Upstream per-sample gradients would treat each of the K rows as a sample: the engine refuses, K=1 works.
    argv = [
        "--latents",
        str(latents),
        "--model",
        "DiT-tiny",
        "--mode",
        "hooks",
        "--noise-multiplier",
        "1.0",
        "--delta",
        "1e-4",
        "--batch-size",
        "100",
        "--max-steps",
        "1",
        "--no-progress",
        "--probe-size",
        "0",
    ]
    with pytest.raises(PrivacyConfigError, match="noise multiplicity"):
        _run(argv + ["--noise-multiplicity", "2"])
    assert _run(argv)["steps"] == 1


def test_compiled_training_matches_eager_training(latents, tmp_path, monkeypatch):
    """--compile trains through the engine's compiled path (Poisson batches of varying size) to the same model and
    ledger as eager training. Traced as for Inductor, compiled by aot_eager (no C++ build on the CPU test machine)."""
    from memory_test.privacy.grad_sample_module import DPGradSampleModule

    compile_private = DPGradSampleModule.compile
    monkeypatch.setattr(
        DPGradSampleModule, "compile", lambda self, **kw: compile_private(self, backend="aot_eager", **kw)
    )
    torch._dynamo.reset()
    run = ("--batch-size", 100, "--physical-batch-size", 32, "--epochs", 1, "--max-steps", 3, "--noise-multiplier", 1.0)
    eager = _run(_args(latents, tmp_path, *run, "--checkpoint", tmp_path / "eager.pt"))
    from memory_test.profiling.compile_stats import compile_stats

    before = compile_stats()
    compiled = _run(_args(latents, tmp_path, *run, "--compile", "default", "--checkpoint", tmp_path / "compiled.pt"))
    done = compile_stats().since(before)
    torch._dynamo.reset()
    assert done.graphs >= 1 and done.graph_breaks == 0
    assert eager["accountant_history"] == compiled["accountant_history"] and eager["epsilon"] == compiled["epsilon"]
    a, b = checkpoint.load_checkpoint(tmp_path / "eager.pt"), checkpoint.load_checkpoint(tmp_path / "compiled.pt")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_resume_under_another_compile_setting_continues_the_same_run(latents, tmp_path, monkeypatch, capsys):
    """--compile changes how a step is computed, not the update: a run checkpointed compiled and resumed eagerly
    ends with the ledger and the model of an eager run (the resume says that the setting changed)."""
    from memory_test.privacy.grad_sample_module import DPGradSampleModule

    compile_private = DPGradSampleModule.compile
    monkeypatch.setattr(
        DPGradSampleModule, "compile", lambda self, **kw: compile_private(self, backend="aot_eager", **kw)
    )
    torch._dynamo.reset()
    run = ("--batch-size", 100, "--physical-batch-size", 32, "--epochs", 1, "--noise-multiplier", 1.0)
    eager = _run(_args(latents, tmp_path, *run, "--max-steps", 3, "--checkpoint", tmp_path / "eager.pt"))
    mixed = tmp_path / "mixed.pt"
    _run(_args(latents, tmp_path, *run, "--max-steps", 2, "--compile", "default", "--checkpoint", mixed))
    torch._dynamo.reset()
    capsys.readouterr()
    resumed = _run(_args(latents, tmp_path, *run, "--max-steps", 3, "--checkpoint", mixed, "--resume"))
    assert "resuming with --compile off (the checkpoint ran with default)" in capsys.readouterr().out
    assert resumed["accountant_history"] == eager["accountant_history"] and resumed["epsilon"] == eager["epsilon"]
    a, b = checkpoint.load_checkpoint(tmp_path / "eager.pt"), checkpoint.load_checkpoint(mixed)
    assert b["run"]["compile"] == "off"
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
