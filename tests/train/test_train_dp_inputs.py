"""train_dp's inputs: every flag checked before any work, the ledger never overwritten, σ = 0 only as non-private."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memory_test.cli_common.errors import EXIT_BAD_INPUT
from memory_test.train import args as train_args
from memory_test.train import checkpoint
from memory_test.train import run as train_dp
from tests.conftest import tiny_latents

N = 64  # images in the tiny latent file: δ must stay below 1/64


@pytest.fixture()
def latents(tmp_path):
    torch.manual_seed(0)
    return tiny_latents(tmp_path / "lat.safetensors", N)


def _argv(latents, *extra):
    base = ["--latents", str(latents), "--model", "DiT-tiny", "--mode", "flash_bk", "--batch-size", "16"]
    base += ["--physical-batch-size", "16", "--delta", "1e-3", "--no-progress", "--probe-size", "0", "--device", "cpu"]
    return base + [str(e) for e in extra]


def _main(argv, capsys) -> tuple[int, str]:
    code = train_dp.main(argv)
    return code, capsys.readouterr().err.strip()


def test_existing_checkpoint_is_refused_without_resume(latents, tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"a 24-step run and its privacy ledger")
    code, err = _main(_argv(latents, "--noise-multiplier", 1, "--checkpoint", ckpt, "--max-steps", 1), capsys)
    assert code == EXIT_BAD_INPUT and "already exists" in err and "add --resume" in err
    assert ckpt.read_bytes() == b"a 24-step run and its privacy ledger"
    with pytest.raises(SystemExit):
        train_args.parse_args(["--help"])
    assert "refused unless --resume" in " ".join(capsys.readouterr().out.split())  # --help says so


BAD = {  # flags -> text of the one-line error; none of them may start any work
    "batch 0": (["--noise-multiplier", 1, "--batch-size", 0], "--batch-size must be an integer >= 1"),
    "batch above N": (["--noise-multiplier", 1, "--batch-size", N + 1], f"--batch-size {N + 1} exceeds the {N} "),
    "physical batch 0": (["--noise-multiplier", 1, "--physical-batch-size", 0], "--physical-batch-size must be"),
    "sigma nan": (["--noise-multiplier", "nan"], "--noise-multiplier (σ) must be a finite number >= 0"),
    "sigma -1": (["--noise-multiplier", -1], "--noise-multiplier (σ) must be a finite number >= 0"),
    "sigma 0": (["--noise-multiplier", 0], "adds no noise: the run would not be private"),
    "non-private with noise": (["--noise-multiplier", 1, "--non-private"], "--non-private goes with"),
    "clip 0": (["--noise-multiplier", 1, "--max-grad-norm", 0], "--max-grad-norm (C) must be a finite number > 0"),
    "clip inf": (["--noise-multiplier", 1, "--max-grad-norm", "inf"], "--max-grad-norm (C) must be"),
    "target eps 0": (["--target-epsilon", 0], "--target-epsilon must be a finite number > 0"),
    "target eps inf": (["--target-epsilon", "inf"], "--target-epsilon must be a finite number > 0"),
    "delta >= 1/N": (["--noise-multiplier", 1, "--delta", 0.05], "must be in (0, 1/N)"),
    "lr 0": (["--noise-multiplier", 1, "--lr", 0], "--lr must be a finite number > 0"),
    "cuda without a GPU": (["--noise-multiplier", 1, "--device", "cuda"], "no CUDA GPU is available"),
    "resume without checkpoint": (["--noise-multiplier", 1, "--resume"], "--resume needs --checkpoint"),
    "metrics in a file": (["--noise-multiplier", 1, "--metrics-out", "{file}/m.json"], "is a file, not a folder"),
    "corrupt latents": (["--noise-multiplier", 1, "--latents", "{garbage}"], "is not a readable safetensors file"),
    "corrupt checkpoint": (["--noise-multiplier", 1, "--checkpoint", "{garbage}", "--resume"], "cannot be read"),
    "checkpoint empty": (["--noise-multiplier", 1, "--checkpoint", ""], "--checkpoint is empty"),
    "metrics empty": (["--noise-multiplier", 1, "--metrics-out", ""], "--metrics-out is empty"),
    "pretrained path alone": (["--noise-multiplier", 1, "--pretrained-path", "{file}"], "add --pretrained"),
    "compile reduce-overhead": (["--noise-multiplier", 1, "--compile", "reduce-overhead"], "not yet verified exact"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_in_one_line_before_any_work(case, latents, tmp_path, capsys, monkeypatch):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")

    def no_work(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(train_dp, "build_model", no_work)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a safetensors or torch file" * 10)
    (tmp_path / "file").write_text("x")
    extra = [str(a).format(file=tmp_path / "file", garbage=garbage) for a in BAD[case][0]]
    before = sorted(tmp_path.rglob("*"))
    code, err = _main(_argv(latents, *extra), capsys)
    assert code == EXIT_BAD_INPUT, err
    assert len(err.splitlines()) == 1 and err.startswith("train_dp: error: ") and " — " in err, err
    assert BAD[case][1] in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_sigma_zero_trains_only_as_non_private_and_reports_infinite_epsilon(latents, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    argv = _argv(latents, "--noise-multiplier", 0, "--non-private", "--max-steps", 2, "--metrics-out", metrics)
    s = train_dp.train(train_args.parse_args(argv))
    assert s["steps"] == 2 and s["epsilon"] == math.inf and s["epsilon_infinite"] is True
    out = capsys.readouterr().out
    assert "(ε, δ) = (inf, 0.001)" in out and "NOT PRIVATE" in out
    written = json.loads(metrics.read_text())  # strict JSON: ε is null with the reason beside it, never a number
    assert written["epsilon"] is None and written["epsilon_infinite"] is True and "infinite" in written["epsilon_note"]


def test_resume_with_another_model_is_refused(latents, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    assert train_dp.main(_argv(latents, "--noise-multiplier", 1, "--checkpoint", ckpt, "--max-steps", 1)) == 0
    resume = _argv(latents, "--noise-multiplier", 1, "--checkpoint", ckpt, "--resume", "--model", "DiT-S/2")
    code, err = _main(resume, capsys)
    assert code == EXIT_BAD_INPUT and "holds a DiT-tiny model, not --model DiT-S/2" in err, err
    assert "pass --model DiT-tiny" in err


def test_resume_mid_epoch_keeps_the_epoch_train_loss(latents, tmp_path):
    # 64 images, expected batch 16: 4 steps per epoch; stop after 2, resume, and the epoch's loss covers all 4.
    run = ["--noise-multiplier", 1, "--epochs", 1, "--noise-multiplicity", 2]
    whole = train_dp.train(train_args.parse_args(_argv(latents, *run)))
    ckpt = tmp_path / "ckpt.pt"
    train_dp.train(train_args.parse_args(_argv(latents, *run, "--checkpoint", ckpt, "--max-steps", 2)))
    resumed = train_dp.train(train_args.parse_args(_argv(latents, *run, "--checkpoint", ckpt, "--resume")))
    assert resumed["accountant_history"] == whole["accountant_history"]
    assert resumed["history"][-1]["train_loss"] == whole["history"][-1]["train_loss"]


def test_resume_with_another_lr_is_refused_and_the_checkpoint_kept(latents, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    assert train_dp.main(_argv(latents, "--noise-multiplier", 1, "--checkpoint", ckpt, "--max-steps", 1)) == 0
    saved = ckpt.read_bytes()
    resume = _argv(latents, "--noise-multiplier", 1, "--checkpoint", ckpt, "--resume", "--lr", "1e-3")
    code, err = _main(resume, capsys)
    assert code == EXIT_BAD_INPUT and "changed training settings (--lr 0.0001 -> 0.001)" in err, err
    assert ckpt.read_bytes() == saved


def test_resume_under_another_compile_setting_is_allowed_and_said(capsys):
    # compile changes how a step is computed, not the update (test_compiled_training_matches_eager_training)
    args = train_args.parse_args(["--latents", "x", "--noise-multiplier", "1", "--compile", "off"])
    checkpoint.check_training_settings({"lr": args.lr, "class_dropout": args.class_dropout, "compile": "default"}, args)
    assert "resuming with --compile off (the checkpoint ran with default)" in capsys.readouterr().out
    checkpoint.check_training_settings({"model": "DiT-tiny"}, args)  # checkpoints from before: not checked
