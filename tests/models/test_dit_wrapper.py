"""DiT wrapper, size registry and attention processor on the tiny preset (CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from safetensors.torch import load_file, save_file
from torch.backends.cuda import SDPAParams
from torch.nn.attention import SDPBackend

from memory_test.models import attention
from memory_test.models.attention import RecordingAttnProcessor
from memory_test.models.dit_huggingface_wrapper import DiTHuggingFaceWrapper, PretrainedWeightsNotFoundError
from memory_test.models.dit_presets import DIT_MODELS, build_dit_config, dit_facts, resolve_model_name
from tests.models.dit_tiny_batches import NUM_CLASSES, SIDE, batch, tiny


def test_output_shapes_and_per_sample_loss():
    w = tiny().eval()
    x, t, y, eps = batch(3)
    pred = w(x, t, y)
    assert pred.shape == (3, 4, SIDE, SIDE)
    full = w.model(x, timestep=t, class_labels=y).sample
    assert full.shape == (3, 8, SIDE, SIDE)
    torch.testing.assert_close(pred, full[:, :4])
    pred2, loss = w(x, t, y, eps)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, ((pred2 - eps) ** 2).mean(dim=(1, 2, 3)))
    assert w.tokens_per_sample == (SIDE // 2) ** 2 and w.num_params == dit_facts(w.config).num_params


def test_rgb_and_bad_sizes_rejected():
    with pytest.raises(ValueError, match="4-channel VAE latents.*rgb_to_latent"):
        tiny(in_channels=3)
    w = tiny()
    x, t, y, _ = batch(2)
    with pytest.raises(ValueError, match="4-channel VAE latents.*AutoencoderKL"):
        w(torch.randn(2, 3, SIDE, SIDE), t, y)
    with pytest.raises(ValueError, match="built for 8x8 latents"):
        w(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"multiple of 8\*patch_size=16"):
        tiny(img_size=72)
    with pytest.raises(ValueError, match="labels must be integer"):
        w(x, t, y.float())
    with pytest.raises(ValueError, match="512px model"):
        build_dit_config("facebook/DiT-XL-2-512", img_size=256)
    with pytest.raises(ValueError, match="patch size 2"):
        build_dit_config("DiT-XL/2", patch_size=4)


def test_registry_presets_and_xl_param_count():
    assert set(DIT_MODELS) == {"DiT-tiny", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"}
    for name in [*DIT_MODELS, "facebook/DiT-XL-2-512", "DiT-B/4"]:
        cfg = build_dit_config(name)
        with torch.device("meta"):
            model = DiTTransformer2DModel(**cfg)
        assert sum(p.numel() for p in model.parameters()) == dit_facts(cfg).num_params, name
    xl = dit_facts(build_dit_config("facebook/DiT-XL-2-256"))
    # diffusers keeps one timestep/label embedder per block; with one shared embedder it is the paper's model
    # (675,129,632 there counts the frozen 256x1152 sin-cos pos-embed as a parameter).
    assert xl.num_params == 749_826_464
    assert xl.num_params_shared_embedder == 674_834_720 == 675_129_632 - 256 * 1152
    assert xl.tokens_per_sample == 256 and xl.hidden_size == 1152
    assert build_dit_config("facebook/DiT-XL-2-512")["sample_size"] == 64
    assert resolve_model_name("facebook/DiT-XL-2-256").preset == DIT_MODELS["DiT-XL/2"]
    with pytest.raises(ValueError, match="unknown DiT model"):
        resolve_model_name("DiT-XXL/2")


def _capture_embedder_labels(w: DiTHuggingFaceWrapper) -> list:
    seen = []
    for block in w.model.transformer_blocks:
        block.norm1.emb.class_embedder.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    return seen


def test_class_dropout_once_per_sample():
    w = tiny(class_dropout_prob=0.5)
    for block in w.model.transformer_blocks:
        emb = block.norm1.emb.class_embedder
        assert emb.dropout_prob == 0 and emb.embedding_table.num_embeddings == NUM_CLASSES + 1
    seen = _capture_embedder_labels(w)
    x, t, _, _ = batch(64)
    y = torch.randint(0, NUM_CLASSES, (64,), generator=torch.Generator().manual_seed(3))
    w(x, t, y, generator=torch.Generator().manual_seed(1))
    # Every block plus block 0's second call for the output head: 2 + 1 embedder calls, identical labels.
    assert len(seen) == 3 and all(torch.equal(s, seen[0]) for s in seen)
    dropped = seen[0] == NUM_CLASSES
    assert 0 < dropped.sum() < 64 and torch.equal(seen[0][~dropped], y[~dropped])
    seen.clear()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:5] = True
    w(x, t, y, drop_mask=mask)
    assert all(torch.equal(s, torch.where(mask, NUM_CLASSES, y)) for s in seen)
    seen.clear()
    w.eval()(x, t, y)
    assert all(torch.equal(s, y) for s in seen)


def test_attention_processor_matches_diffusers_float64():
    x, t, y, eps = batch(3, torch.float64)
    for flash, expect in ((True, "flash"), (False, "math")):  # on CPU "flash" is SDPA's CPU flash kernel
        w = tiny(use_flash_attention=flash).double().eval()
        pred, loss = w(x, t, y, eps)
        grads = torch.autograd.grad(loss.sum(), list(w.parameters()))
        assert w.attention_backend == expect and w.attention_processor.fallbacks == {}
        for proc in (AttnProcessor(), AttnProcessor2_0()):  # diffusers' unfused and default processors
            ref = _with_processor(copy.deepcopy(w.model), proc)
            ref_pred = ref(x, timestep=t, class_labels=y).sample[:, :4]
            torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-12)
            ref_loss = ((ref_pred - eps) ** 2).mean(dim=(1, 2, 3)).sum()
            for g, g_ref in zip(grads, torch.autograd.grad(ref_loss, list(ref.parameters()))):
                torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    w.attention_processor.calls["flash"] += 1
    assert w.attention_backend == "mixed:flash+math"


def test_cuda_policy_records_fallbacks(monkeypatch):
    proc = RecordingAttnProcessor(use_flash_attention=True)
    q = torch.randn(1, 2, 4, 8)
    params = SDPAParams(q, q, q, None, 0.0, False, False)
    verdicts = {"can_use_sdpa_flash": False, "can_use_cudnn_attention": False, "can_use_efficient_attention": True}
    for name, ok in verdicts.items():
        monkeypatch.setattr(attention, name, lambda p, ok=ok: ok)
    with pytest.warns(UserWarning, match="runs on SDPA 'efficient'"):
        assert proc._pick_cuda(params) == SDPBackend.EFFICIENT_ATTENTION
    assert "SDPA flash cannot run on torch.float32" in proc.fallbacks["efficient"]
    monkeypatch.setattr(attention, "can_use_efficient_attention", lambda p: False)
    with pytest.warns(UserWarning, match="runs on SDPA 'math'"):
        assert proc._pick_cuda(params) == SDPBackend.MATH
    monkeypatch.setattr(attention, "can_use_sdpa_flash", lambda p: True)
    assert proc._pick_cuda(params) == SDPBackend.FLASH_ATTENTION
    assert set(proc.fallbacks) == {"efficient", "math"}


def _with_processor(model: DiTTransformer2DModel, proc) -> DiTTransformer2DModel:
    for block in model.transformer_blocks:
        block.attn1.set_processor(proc)
    return model


def test_autocast_bf16_runs_and_records_backend():
    w = tiny()
    x, t, y, eps = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, loss = w(x, t, y, eps)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert w.attention_backend == "flash"


def test_gradients_reach_every_parameter():
    w = tiny()
    assert all(p.requires_grad for p in w.parameters())
    x, t, y, eps = batch(4)
    w(x, t, y, eps)[1].sum().backward()
    zero = [n for n, p in w.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert zero == []
    emb = w.model.transformer_blocks[0].norm1.emb
    assert emb.class_embedder.embedding_table.weight.grad[y].abs().sum() > 0
    assert emb.timestep_embedder.linear_1.weight.grad.abs().sum() > 0
    # proj_out_2 rows are (patch_i, patch_j, channel) with 8 channels; channels 4..7 (learned sigma) get no gradient.
    sigma_rows = torch.arange(w.model.proj_out_2.out_features) % 8 >= 4
    assert w.model.proj_out_2.weight.grad[sigma_rows].abs().sum() == 0
    assert w.model.proj_out_2.weight.grad[~sigma_rows].abs().sum() > 0


def _save_hub_style(model: DiTTransformer2DModel, model_dir):
    """save_pretrained, then make config.json look like the Hub's legacy DiT one."""
    model.save_pretrained(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(_class_name="Transformer2DModel", cross_attention_dim=None, use_linear_projection=False)
    cfg_path.write_text(json.dumps(cfg))


def test_pretrained_from_local_path(tmp_path):
    src = tiny()
    _save_hub_style(src.model, tmp_path / "pipe" / "transformer")
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        w = tiny(pretrained=True, pretrained_path=path)
        assert w.training and all(p.requires_grad for p in w.parameters())
        sd = w.model.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in src.model.state_dict().items())
        assert w.model.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob == 0


def test_pretrained_from_hub_cache(tmp_path, monkeypatch):
    src = tiny()
    repo = tmp_path / "hub" / "models--facebook--DiT-tiny-test"
    _save_hub_style(src.model, repo / "snapshots" / "0123abcd" / "transformer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    w = tiny(pretrained=True, hub_repo_id="facebook/DiT-tiny-test")
    assert torch.equal(w.model.proj_out_2.weight, src.model.proj_out_2.weight)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(PretrainedWeightsNotFoundError, match=r"facebook/DiT-tiny-test.*empty.*pretrained_path"):
        tiny(pretrained=True, hub_repo_id="facebook/DiT-tiny-test")
    with pytest.raises(PretrainedWeightsNotFoundError, match="DiT-XL-2-256"):
        DiTHuggingFaceWrapper("facebook/DiT-XL-2-256", pretrained=True)


def test_bad_checkpoints_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DiT weights"):
        tiny(pretrained=True, pretrained_path=tmp_path)
    with pytest.raises(ValueError, match="pretrained=True"):
        tiny(pretrained_path=tmp_path)
    with pytest.raises(PretrainedWeightsNotFoundError, match="pretrained_path"):
        tiny(pretrained=True)  # no published checkpoint has the tiny config
    src = tiny()
    _save_hub_style(src.model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="num_embeds_ada_norm: checkpoint=10 requested=5"):
        DiTHuggingFaceWrapper("DiT-tiny", num_classes=5, pretrained=True, pretrained_path=tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["proj_out_2.bias"]
    save_file(sd, weights)
    with pytest.raises(ValueError, match="proj_out_2.bias"):
        tiny(pretrained=True, pretrained_path=tmp_path / "ckpt")
