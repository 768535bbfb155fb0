"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``) with its config embedded, and RGB -> latent encoding."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

# The architecture of stabilityai/sd-vae-ft-mse (and -ft-ema), the VAE the DiT paper trains on: 8x downsampling,
# 4 latent channels. Embedded so a bare weights file is enough and no network is needed to build the model.
SD_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# Same topology (four blocks, hence the same 8x downsampling and 4 latent channels), a few thousand times smaller:
# for CPU tests only.
TINY_VAE_CONFIG: dict = {
    **SD_VAE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}

VAE_CONFIGS = {"sd": SD_VAE_CONFIG, "tiny": TINY_VAE_CONFIG}
# Where each config's trained weights live on the Hugging Face Hub (looked up in the local cache only).
DEFAULT_REPOS = {"sd": "stabilityai/sd-vae-ft-mse"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Old diffusers checkpoints (sd-vae-ft-mse among them) name the mid-block attention projections differently.
_DEPRECATED_ATTENTION_KEYS = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent along each side (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_vae(
    path: str | Path | None = None,
    allow_random_init: bool = False,
    config: str = "sd",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKL:
    """Build the VAE of ``config`` and load trained weights from ``path`` (a directory or a Hub id in the HF cache).

    ``path=None`` looks up the config's default Hub repo in the local HF cache; random weights only with
    ``allow_random_init=True`` and ``path=None`` (never as a fallback for missing weights).
    """
    if config not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {config!r}; valid: {', '.join(VAE_CONFIGS)}")
    if path is None and allow_random_init:
        log.warning(
            "VAE %r built with RANDOM weights (allow_random_init=True): latents carry no learned meaning", config
        )
        vae = AutoencoderKL(**VAE_CONFIGS[config])
    else:
        if path is None:
            if config not in DEFAULT_REPOS:
                raise FileNotFoundError(
                    f"VAE config {config!r} has no published weights: pass allow_random_init=True to build it randomly"
                )
            path = DEFAULT_REPOS[config]
        vae = _load_weights(_resolve_dir(str(path)), VAE_CONFIGS[config])
    vae = vae.to(device=device)
    if dtype != torch.float32:  # diffusers warns on any dtype cast, even a no-op one
        vae = vae.to(dtype=dtype)
    return vae.eval().requires_grad_(False)


def _resolve_dir(path: str) -> Path:
    """A local directory as is; otherwise a Hub repo id resolved in the local HF cache (no download)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"VAE path {path!r} is a file: pass the directory holding {WEIGHT_FILES[0]}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as err:
        raise FileNotFoundError(
            f"no VAE weights at {path!r}: it is neither a local directory nor a repo in the Hugging Face cache. "
            f"On a machine with internet run `hf download {DEFAULT_REPOS['sd']}` (or copy a directory "
            f"holding {WEIGHT_FILES[0]}) and pass that directory"
        ) from err


def _load_weights(directory: Path, embedded_config: dict) -> AutoencoderKL:
    """AutoencoderKL from ``directory``: its config.json if present (else the embedded one), weights strictly."""
    config_file = directory / "config.json"
    if config_file.exists():
        cfg = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    else:
        cfg = dict(embedded_config)
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        vae = AutoencoderKL(**cfg)
        vae.load_state_dict(_rename_deprecated_keys(state), strict=True)
    except Exception as e:  # truncated file, foreign format, other architecture: say which file
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{weights} cannot be loaded as this VAE's weights ({type(e).__name__}: {first}) — pass the directory of "
            f"a complete {DEFAULT_REPOS['sd']} download (`hf download {DEFAULT_REPOS['sd']}`)"
        ) from None
    return vae


def _rename_deprecated_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in _DEPRECATED_ATTENTION_KEYS.items():
            key = key.replace(old, new)
        # The old projections were stored as 1x1 convs in some checkpoints; the new ones are Linear.
        if ".to_" in key and key.endswith(".weight") and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def rgb_to_latent(
    vae: AutoencoderKL,
    images: torch.Tensor,
    sample: bool = True,
    generator: torch.Generator | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Encode RGB ``images`` (B, 3, H, W) in ``value_range`` ((0, 1) or (-1, 1)) to scaled latents (B, 4, H/8, W/8).

    ``sample=True`` draws from the posterior (as DiT does), ``False`` takes its mean.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"rgb_to_latent expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}; "
            "convert grayscale with `x.expand(-1, 3, -1, -1)` and move channels first"
        )
    factor = downsample_factor(vae)
    if images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"image side {tuple(images.shape[-2:])} must be divisible by the VAE's downsampling {factor}")
    lo, hi = value_range
    if (lo, hi) not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range}")
    # Declared, not guessed: a dark [-1, 1] image and a [0, 1] image cannot be told apart by their values.
    tol = 1e-3
    if images.min().item() < lo - tol or images.max().item() > hi + tol:
        raise ValueError(
            f"images span [{images.min().item():.3f}, {images.max().item():.3f}], outside value_range={value_range}; "
            "pass the range they are in, (0, 1) or (-1, 1)"
        )
    param = next(vae.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    if lo == 0.0:
        x = x * 2.0 - 1.0
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
    return z * vae.config.scaling_factor


def fit_scaling_factor(
    vae: AutoencoderKL, images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """1 / std of the unscaled posterior means of ``images``: how SD's 0.18215 was chosen; for new or random VAEs."""
    z = rgb_to_latent(vae, images, sample=False, value_range=value_range) / vae.config.scaling_factor
    return 1.0 / z.float().std().item()
