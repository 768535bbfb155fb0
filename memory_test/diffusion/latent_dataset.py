"""One-off VAE encoding of an image folder to a latent file (atomic, resumable), and the dataset that reads it."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from .vae import VAE_CONFIGS, load_vae, rgb_to_latent

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FORMAT = "memory_test.latents.v1"


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout (root/<class>/<image>): sorted files, their class indices, sorted class names."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [index] * len(found)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files, labels, classes


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """RGB (3, S, S) in [0, 1]: DiT's center_crop_arr (box-halve, bicubic resize of the short side, centre crop)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        while min(im.size) >= 2 * image_size:
            im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
        scale = image_size / min(im.size)
        im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
        arr = np.asarray(im)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    arr = arr[top : top + image_size, left : left + image_size]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _fingerprint(root: Path, files, labels, image_size, sample, seed, vae, dtype) -> str:
    """Identity of a pre-compute: inputs (names, sizes), settings and VAE weights; resuming requires equality."""
    h = hashlib.sha256()
    h.update(json.dumps([image_size, sample, seed, str(dtype), dict(vae.config)], sort_keys=True, default=str).encode())
    for f, y in zip(files, labels, strict=True):
        h.update(f"{f.relative_to(root)}|{f.stat().st_size}|{y}\n".encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def precompute_latents(
    image_root: str | Path,
    out_path: str | Path,
    vae,
    image_size: int,
    batch_size: int = 32,
    sample: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Path:
    """Encode every image under ``image_root`` to ``out_path`` (safetensors: latents, labels, class names).

    Work is saved chunk by chunk in ``<out_path>.partial/``; a rerun with the same inputs skips finished chunks,
    and chunk i always uses seed ``(seed, i)``, so an interrupted and an uninterrupted run write the same file.
    """
    root, out = Path(image_root), Path(out_path)
    files, labels, classes = list_image_folder(root)
    fingerprint = _fingerprint(root, files, labels, image_size, sample, seed, vae, dtype)
    if out.exists():
        if read_metadata(out).get("fingerprint") != fingerprint:
            raise FileExistsError(f"{out} exists and was made from other images or settings: delete it or pick a path")
        return out
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    manifest = partial / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["fingerprint"] != fingerprint:
        raise FileExistsError(f"{partial} belongs to a different pre-compute (inputs or settings changed): delete it")
    manifest.write_text(json.dumps({"fingerprint": fingerprint, "num_images": len(files)}))

    n_chunks = (len(files) + batch_size - 1) // batch_size
    chunk = [partial / f"chunk_{i:06d}.safetensors" for i in range(n_chunks)]
    done = sum(p.exists() for p in chunk)
    device = next(vae.parameters()).device
    with tqdm(total=n_chunks, initial=done, desc="encoding latents", unit="batch", disable=not progress) as bar:
        for i in range(n_chunks):
            if chunk[i].exists():
                continue
            sl = slice(i * batch_size, (i + 1) * batch_size)
            images = torch.stack([load_image(f, image_size) for f in files[sl]])
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            z = rgb_to_latent(vae, images, sample=sample, generator=generator)
            _atomic_save({"latents": z.to(dtype).cpu().contiguous()}, chunk[i])
            bar.update(1)

    latents = torch.cat([load_file(str(p))["latents"] for p in chunk])
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "classes": json.dumps(classes),
        "image_size": str(image_size),
        "sample": str(sample),
        "scaling_factor": str(vae.config.scaling_factor),
    }
    _atomic_save({"latents": latents, "labels": torch.tensor(labels, dtype=torch.int64)}, out, metadata)
    shutil.rmtree(partial)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a latent file."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


class LatentDataset(Dataset):
    """Items ``(latent (4, h, w), label)`` from a file written by :func:`precompute_latents` (held in memory)."""

    def __init__(self, path: str | Path):
        meta = read_metadata(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a latent file written by precompute_latents (format {meta.get('format')})")
        tensors = load_file(str(path))
        self.latents, self.labels = tensors["latents"], tensors["labels"]
        self.classes: list[str] = json.loads(meta["classes"])
        self.image_size = int(meta["image_size"])
        self.path = Path(path)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[i].float(), self.labels[i]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Encode an image folder (root/<class>/<image>) to a latent file.")
    p.add_argument("--images", required=True, help="image folder root with one subfolder per class")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", default=None, help="VAE weights directory or Hub id in the HF cache (default: SD VAE)")
    p.add_argument("--vae-config", default="sd", choices=sorted(VAE_CONFIGS))
    p.add_argument("--random-vae", action="store_true", help="random VAE weights (tests only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mean", action="store_true", help="store the posterior mean instead of a sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp16", action="store_true", help="store latents in float16 (half the disk)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    vae = load_vae(a.vae, allow_random_init=a.random_vae, config=a.vae_config, device=a.device)
    out = precompute_latents(
        a.images,
        a.out,
        vae,
        a.image_size,
        batch_size=a.batch_size,
        sample=not a.mean,
        seed=a.seed,
        dtype=torch.float16 if a.fp16 else torch.float32,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
