"""One-off VAE encoding of an image folder to a latent file (atomic, resumable), and the dataset that reads it."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from memory_test.cli_common.errors import ToolArgumentParser, ToolError, run_tool
from memory_test.cli_common.files import atomic_path, atomic_write_text, check_output_path

from .vae import VAE_CONFIGS, load_vae, rgb_to_latent

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
FORMAT = "memory_test.latents.v1"
FINGERPRINT_METHOD = "sha256 of the settings, the VAE weights and each image's path, label and content"


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
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            while min(im.size) >= 2 * image_size:
                im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
            scale = image_size / min(im.size)
            im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # corrupt, truncated, not an image
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    arr = arr[top : top + image_size, left : left + image_size]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def file_digest(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks (images of any size, constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _settings_fingerprint(image_size, sample, seed, vae, dtype) -> str:
    """The settings and VAE weights a pre-compute used: its chunks and its output are only valid for these."""
    h = hashlib.sha256()
    h.update(json.dumps([image_size, sample, seed, str(dtype), dict(vae.config)], sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _inputs_fingerprint(settings: str, root: Path, files, labels, digests, tag: str = "") -> str:
    """Identity of encoding these images (path, label, content) under these settings; equal means reusable."""
    h = hashlib.sha256(f"{settings}|{tag}\n".encode())
    for f, y, d in zip(files, labels, digests, strict=True):
        h.update(f"{f.relative_to(root)}|{y}|{d}\n".encode())
    return h.hexdigest()


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _chunk_inputs(path: Path) -> str | None:
    """The input fingerprint a finished chunk was encoded from (None: unreadable or from an older version)."""
    try:
        return read_metadata(path).get("inputs")
    except ValueError:
        return None


def _open_partial(partial: Path, settings: str) -> None:
    """Create or reuse ``<out>.partial/``; refuse one holding finished work made with other settings or VAE."""
    manifest = partial / "manifest.json"
    if manifest.exists():
        try:
            theirs = json.loads(manifest.read_text()).get("fingerprint")
        except (OSError, ValueError):
            theirs = None
        if theirs != settings and any(partial.glob("chunk_*.safetensors")):
            raise FileExistsError(
                f"{partial} belongs to a different pre-compute (other settings or VAE, or an older version) — "
                f"rerun with those settings to finish it, or delete {partial} to start over with these"
            )
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest, json.dumps({"fingerprint": settings}))


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

    Work is saved chunk by chunk in ``<out_path>.partial/``; a rerun skips the chunks whose images (path, label and
    content) and settings are unchanged and re-encodes the others, and chunk i always uses seed ``(seed, i)``, so an
    interrupted and an uninterrupted run write the same file. An existing ``out_path`` made from other images or
    settings is refused, never replaced.
    """
    root, out = Path(image_root), Path(out_path)
    files, labels, classes = list_image_folder(root)
    settings = _settings_fingerprint(image_size, sample, seed, vae, dtype)
    digests = [file_digest(f) for f in files]
    fingerprint = _inputs_fingerprint(settings, root, files, labels, digests)
    if out.exists():
        if read_metadata(out).get("fingerprint") != fingerprint:
            raise FileExistsError(
                f"{out} exists and was made from other images or settings (or by an older version) — delete it to "
                "encode the current images, or choose another --out"
            )
        return out
    partial = out.with_name(out.name + ".partial")
    _open_partial(partial, settings)

    n_chunks = (len(files) + batch_size - 1) // batch_size
    chunks = [partial / f"chunk_{i:06d}.safetensors" for i in range(n_chunks)]
    slices = [slice(i * batch_size, (i + 1) * batch_size) for i in range(n_chunks)]
    wanted = [
        _inputs_fingerprint(settings, root, files[sl], labels[sl], digests[sl], tag=f"chunk {i}")
        for i, sl in enumerate(slices)
    ]
    todo = [i for i in range(n_chunks) if not chunks[i].exists() or _chunk_inputs(chunks[i]) != wanted[i]]
    device = next(vae.parameters()).device
    with tqdm(total=n_chunks, initial=n_chunks - len(todo), desc="encoding latents", disable=not progress) as bar:
        for i in todo:
            try:
                images = torch.stack([load_image(f, image_size) for f in files[slices[i]]])
            except ValueError as e:
                raise ValueError(
                    f"{e} — fix or remove that file and rerun the same command: finished batches in {partial} are kept"
                ) from None
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            z = rgb_to_latent(vae, images, sample=sample, generator=generator)
            _atomic_save({"latents": z.to(dtype).cpu().contiguous()}, chunks[i], {"inputs": wanted[i]})
            bar.update(1)

    latents = torch.cat([load_file(str(p))["latents"] for p in chunks])
    metadata = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "fingerprint_method": FINGERPRINT_METHOD,
        "classes": json.dumps(classes),
        "image_size": str(image_size),
        "sample": str(sample),
        "scaling_factor": str(vae.config.scaling_factor),
    }
    _atomic_save({"latents": latents, "labels": torch.tensor(labels, dtype=torch.int64)}, out, metadata)
    shutil.rmtree(partial)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a latent file; ValueError naming the file if it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


class LatentDataset(Dataset):
    """Items ``(latent (4, h, w), label)`` from a file written by :func:`precompute_latents` (held in memory)."""

    def __init__(self, path: str | Path):
        meta = read_metadata(path)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a latent file written by precompute_latents (format {meta.get('format')})")
        try:
            tensors = load_file(str(path))
            self.latents, self.labels = tensors["latents"], tensors["labels"]
            self.classes: list[str] = json.loads(meta["classes"])
            self.image_size = int(meta["image_size"])
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a complete latent file ({type(e).__name__}: {e})") from None
        self.fingerprint = meta.get("fingerprint")
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


TOOL = "latent_dataset"


def parse_args(argv=None) -> argparse.Namespace:
    p = ToolArgumentParser(
        prog=TOOL,
        description="Encode an image folder (root/<class>/<image>) to a latent file.",
        epilog="Exit codes: 0 written (or already up to date), 1 unexpected failure, 2 bad input (one line "
        "`latent_dataset: error: <what> — <what to do>`), 130 interrupted (finished batches are kept; rerun to "
        "continue). MEMORY_TEST_DEBUG=1 shows tracebacks.",
    )
    p.add_argument("--images", required=True, help="image folder root with one subfolder per class")
    p.add_argument("--out", required=True, help="latent file to write (.safetensors)")
    p.add_argument("--image-size", type=int, default=256, help="pixels per side: a positive multiple of 8")
    p.add_argument("--vae", default=None, help="VAE weights directory or Hub id in the HF cache (default: SD VAE)")
    p.add_argument("--vae-config", default="sd", choices=sorted(VAE_CONFIGS))
    p.add_argument("--random-vae", action="store_true", help="random VAE weights from --seed (tests only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mean", action="store_true", help="store the posterior mean instead of a sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp16", action="store_true", help="store latents in float16 (half the disk)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    """Every flag before any work, so a bad one leaves nothing behind (no .partial folder)."""
    images = Path(a.images)
    if not images.is_dir():
        what = "is a file, not a folder" if images.exists() else "does not exist"
        raise ToolError(f"--images {images} {what}", "give the folder holding one subfolder per class")
    factor = 2 ** (len(VAE_CONFIGS[a.vae_config]["block_out_channels"]) - 1)
    if a.image_size < factor or a.image_size % factor:
        raise ToolError(
            f"--image-size must be a positive multiple of {factor} (the VAE downsamples {factor}x), got {a.image_size}",
            "e.g. --image-size 256",
        )
    if a.batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {a.batch_size}", "e.g. --batch-size 32")
    if a.vae is not None and a.random_vae:
        raise ToolError("--vae and --random-vae exclude each other", "drop --random-vae to use trained weights")
    check_output_path(a.out, "--out")
    _check_device(a.device)


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ToolError(f"--device {name!r}: {e}", "use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: no CUDA GPU is available", "use --device cpu")


def _encode(a: argparse.Namespace) -> int:
    check_args(a)
    files, _, _ = list_image_folder(a.images)  # before the VAE is loaded: an empty folder fails at once
    if a.random_vae:  # the same random weights on every run, so an interrupted run can be resumed
        torch.manual_seed(a.seed)
    vae = load_vae(a.vae, allow_random_init=a.random_vae, config=a.vae_config, device=a.device)
    existed = Path(a.out).exists()
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
    print(f"{'up to date' if existed else 'wrote'} {out} ({len(files)} images)")
    return 0


def main(argv=None) -> int:
    bad_input = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)  # each names the file and fix
    return run_tool(TOOL, lambda: _encode(parse_args(argv)), bad_input=bad_input)


if __name__ == "__main__":
    sys.exit(main())
