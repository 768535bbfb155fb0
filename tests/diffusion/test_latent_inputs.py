"""latent_dataset: image contents are fingerprinted (a changed image is refused or re-encoded, never served stale),
and bad input ends in one line naming the file, leaving no folder that blocks the next run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from memory_test.cli_common.errors import EXIT_BAD_INPUT
from memory_test.diffusion import latent_dataset as ld
from memory_test.diffusion.vae import load_vae

SIZE = 16  # pixels; the tiny VAE downsamples 8x


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return load_vae(config="tiny", allow_random_init=True)


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture()
def folder(tmp_path):
    """8 BMP images (uncompressed: an edited image keeps its byte size) in 2 classes."""
    root = tmp_path / "images"
    for i in range(8):
        (root / f"class_{i // 4}").mkdir(parents=True, exist_ok=True)
        _image(i).save(root / f"class_{i // 4}" / f"{i:03d}.bmp")
    return root


def _encode(vae, folder, out, **kw):
    return ld.precompute_latents(folder, out, vae, SIZE, batch_size=2, sample=False, progress=False, **kw)


def test_changed_image_of_the_same_size_is_refused_or_reencoded(vae, folder, tmp_path, monkeypatch):
    out = _encode(vae, folder, tmp_path / "lat.safetensors")
    edited = folder / "class_0" / "000.bmp"
    size = edited.stat().st_size
    _image(100).save(edited)
    assert edited.stat().st_size == size  # same name, same size, other pixels
    with pytest.raises(FileExistsError, match="other images or settings"):
        _encode(vae, folder, out)

    # An interrupted pre-compute whose first chunk's image then changes: that chunk is encoded again, not reused.
    real, calls = ld._atomic_save, {"n": 0}

    def dies_after_two_chunks(tensors, path, metadata=None):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        real(tensors, path, metadata)

    monkeypatch.setattr(ld, "_atomic_save", dies_after_two_chunks)
    resumed = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _encode(vae, folder, resumed)
    monkeypatch.setattr(ld, "_atomic_save", real)
    _image(200).save(edited)
    encoded = []
    monkeypatch.setattr(ld, "rgb_to_latent", lambda *a, **k: encoded.append(1) or real_rgb_to_latent(*a, **k))
    _encode(vae, folder, resumed)
    assert len(encoded) == 3  # chunk 0 (its image changed) and chunks 2, 3 (never finished); chunk 1 reused
    fresh = _encode(vae, folder, tmp_path / "fresh.safetensors")
    assert torch.equal(ld.LatentDataset(resumed).latents, ld.LatentDataset(fresh).latents)


real_rgb_to_latent = ld.rgb_to_latent


def _cli(folder, out, *extra):
    return ["--images", str(folder), "--out", str(out), "--vae-config", "tiny", "--random-vae", "--device", "cpu",
            "--image-size", str(SIZE), "--batch-size", "2", *[str(e) for e in extra]]  # fmt: skip


BAD_FLAGS = {
    "no such folder": (["--images", "{tmp}/nowhere"], "does not exist"),
    "image size not a multiple of 8": (["--image-size", 30], "--image-size must be a positive multiple of 8"),
    "batch size 0": (["--batch-size", 0], "--batch-size must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_one_line_and_leave_no_partial_folder(case, folder, tmp_path, capsys):
    flags, expect = BAD_FLAGS[case]
    argv = _cli(folder, tmp_path / "lat.safetensors") + [str(f).format(tmp=tmp_path) for f in flags]
    assert ld.main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("latent_dataset: error: ") and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "lat.safetensors.partial").exists() and not (tmp_path / "lat.safetensors").exists()


def test_corrupt_image_is_named_and_the_run_continues_once_fixed(folder, tmp_path, capsys):
    broken = folder / "class_1" / "007.bmp"
    png = io.BytesIO()
    _image(7).save(png, format="PNG")
    broken.with_suffix(".png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])  # truncated
    broken.unlink()
    out = tmp_path / "lat.safetensors"
    assert ld.main(_cli(folder, out)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line, naming the file
    assert err.startswith("latent_dataset: error: cannot read image " + str(broken.with_suffix(".png"))), err
    assert "finished batches in" in err and len(list(out.with_name(out.name + ".partial").glob("chunk_*"))) == 3
    _image(7).save(broken.with_suffix(".png"))  # fixed: the rerun encodes only the last chunk
    assert ld.main(_cli(folder, out)) == 0
    assert len(ld.LatentDataset(out)) == 8 and not out.with_name(out.name + ".partial").exists()
