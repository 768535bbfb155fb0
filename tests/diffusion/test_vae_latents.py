"""VAE loading and encoding, the image-folder pre-compute (atomic, resumable) and the latent dataset."""

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from memory_test.diffusion import latent_dataset as ld
from memory_test.diffusion.vae import SD_VAE_CONFIG, load_vae, rgb_to_latent


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return load_vae(config="tiny", allow_random_init=True)


@pytest.fixture()
def digit_folder(tmp_path):
    """60 real digit images (sklearn), 3 classes, as PNGs in class subfolders."""
    d = load_digits()
    root = tmp_path / "images"
    for label in (0, 1, 2):
        (root / f"digit_{label}").mkdir(parents=True)
        for j, img in enumerate(d.images[d.target == label][:20]):
            Image.fromarray((img * 255 / 16).astype("uint8")).save(root / f"digit_{label}" / f"{j:03d}.png")
    return root


def test_sd_config_is_the_sd_vae_architecture():
    assert SD_VAE_CONFIG["block_out_channels"] == [128, 256, 512, 512]
    assert SD_VAE_CONFIG["latent_channels"] == 4 and SD_VAE_CONFIG["scaling_factor"] == 0.18215


def test_missing_weights_raise_with_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        load_vae(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="allow_random_init"):
        load_vae(config="tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_vae(str(tmp_path / "empty"), config="tiny")


@pytest.mark.parametrize("with_config", [True, False])
def test_weights_round_trip_from_directory(vae, tmp_path, with_config):
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    if not with_config:  # a bare weights file: the embedded config builds the model
        (tmp_path / "vae" / "config.json").unlink()
    loaded = load_vae(tmp_path / "vae", config="tiny")
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_legacy_bin_with_deprecated_attention_names(vae, tmp_path):
    # Early diffusers checkpoints (sd-vae-ft-mse among them) name the attention projections query/key/value/proj_attn.
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for k, v in vae.state_dict().items():
        for new_name, old_name in old.items():
            k = k.replace(new_name, old_name)
        state[k] = v
    assert any(".query." in k for k in state)
    (tmp_path / "legacy").mkdir()
    torch.save(state, tmp_path / "legacy" / "diffusion_pytorch_model.bin")
    loaded = load_vae(tmp_path / "legacy", config="tiny")
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_rgb_to_latent_shape_scaling_and_ranges(vae):
    x = torch.rand(2, 3, 32, 32)
    z01 = rgb_to_latent(vae, x, sample=False)
    assert z01.shape == (2, 4, 4, 4)
    # (0,1) input and the same image given in (-1,1) encode identically.
    torch.testing.assert_close(z01, rgb_to_latent(vae, x * 2 - 1, sample=False, value_range=(-1.0, 1.0)))
    raw = vae.encode(x * 2 - 1).latent_dist.mean
    torch.testing.assert_close(z01, raw * 0.18215)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(rgb_to_latent(vae, x, generator=g1), rgb_to_latent(vae, x, generator=g2))


def test_rgb_to_latent_errors(vae):
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_latent(vae, torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="outside value_range"):
        rgb_to_latent(vae, torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="divisible"):
        rgb_to_latent(vae, torch.rand(1, 3, 30, 30))


def test_precompute_and_dataset(vae, digit_folder, tmp_path):
    out = ld.precompute_latents(digit_folder, tmp_path / "lat.safetensors", vae, 32, batch_size=16, progress=False)
    ds = ld.LatentDataset(out)
    assert len(ds) == 60 and ds.num_classes == 3 and ds.latent_shape == (4, 4, 4)
    z, y = ds[25]
    assert z.shape == (4, 4, 4) and y.item() == 1
    assert not (tmp_path / "lat.safetensors.partial").exists()
    # The latents are the VAE's encodings of the images, chunk i with seed (0, i).
    imgs = torch.stack([ld.load_image(p, 32) for p in ld.list_image_folder(digit_folder)[0][16:32]])
    expected = rgb_to_latent(vae, imgs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ds.latents[16:32], expected)


def test_precompute_resumes_to_the_same_file(vae, digit_folder, tmp_path, monkeypatch):
    full = ld.precompute_latents(digit_folder, tmp_path / "full.safetensors", vae, 32, batch_size=16, progress=False)
    calls = {"n": 0}
    real = ld._atomic_save

    def dies_after_two_chunks(tensors, path, metadata=None):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        real(tensors, path, metadata)

    monkeypatch.setattr(ld, "_atomic_save", dies_after_two_chunks)
    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        ld.precompute_latents(digit_folder, out, vae, 32, batch_size=16, progress=False)
    assert not out.exists() and len(list((tmp_path / "resumed.safetensors.partial").glob("chunk_*"))) == 2
    monkeypatch.setattr(ld, "_atomic_save", real)
    encoded = []
    monkeypatch.setattr(ld, "rgb_to_latent", lambda *a, **k: encoded.append(1) or rgb_to_latent(*a, **k))
    ld.precompute_latents(digit_folder, out, vae, 32, batch_size=16, progress=False)
    assert len(encoded) == 2  # 4 chunks, 2 already done
    a, b = ld.LatentDataset(full), ld.LatentDataset(out)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.labels, b.labels)


def test_precompute_refuses_stale_partial_or_output(vae, digit_folder, tmp_path):
    out = ld.precompute_latents(digit_folder, tmp_path / "x.safetensors", vae, 32, batch_size=16, progress=False)
    with pytest.raises(FileExistsError, match="other images or settings"):
        ld.precompute_latents(digit_folder, out, vae, 32, batch_size=16, seed=1, progress=False)
    partial = tmp_path / "y.safetensors.partial"
    partial.mkdir()
    (partial / "manifest.json").write_text('{"fingerprint": "other"}')
    (partial / "chunk_000000.safetensors").write_bytes(b"finished work of that other pre-compute")
    with pytest.raises(FileExistsError, match="different pre-compute"):
        ld.precompute_latents(digit_folder, tmp_path / "y.safetensors", vae, 32, batch_size=16, progress=False)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="class subfolders"):
        ld.list_image_folder(tmp_path)
