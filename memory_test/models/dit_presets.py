"""DiT size registry: presets of diffusers ``DiTTransformer2DModel`` config values, name resolution, size facts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

# The SD VAE that DiT was trained on downsamples images 8x into 4 latent channels.
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 4
# diffusers' timestep embedder projects a 256-wide sinusoidal code.
TIMESTEP_FREQ_DIM = 256


@dataclass(frozen=True)
class DiTPreset:
    """Config values of one DiT size (diffusers names); ``sample_size`` is the latent side of its default image."""

    name: str
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int = 2
    sample_size: int = 32
    num_classes: int = 1000
    in_channels: int = LATENT_CHANNELS
    out_channels: int = 2 * LATENT_CHANNELS
    # diffusers spells GELU(approximate="tanh") "gelu-approximate"; "gelu-tanh" is not a name it accepts.
    activation_fn: str = "gelu-approximate"
    attention_bias: bool = True
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def img_size(self) -> int:
        return self.sample_size * VAE_DOWNSAMPLE


DIT_MODELS: dict[str, DiTPreset] = {
    p.name: p
    for p in (
        DiTPreset("DiT-tiny", num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8, num_classes=10),
        DiTPreset("DiT-S/2", num_layers=12, num_attention_heads=6, attention_head_dim=64),
        DiTPreset("DiT-B/2", num_layers=12, num_attention_heads=12, attention_head_dim=64),
        DiTPreset("DiT-L/2", num_layers=24, num_attention_heads=16, attention_head_dim=64),
        DiTPreset("DiT-XL/2", num_layers=28, num_attention_heads=16, attention_head_dim=72),
    )
}

# "DiT-XL/2", "DiT-XL-4", "facebook/DiT-XL-2-256": family, patch size, optional image size.
_NAME_RE = re.compile(r"^(?P<hub>facebook/)?DiT-(?P<family>S|B|L|XL)[/-](?P<patch>\d+)(?:-(?P<img>\d+))?$", re.I)
# Checkpoints published on the Hub (pipeline layout, weights under transformer/).
HUB_CHECKPOINTS = ("facebook/DiT-XL-2-256", "facebook/DiT-XL-2-512")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model name: its preset (patch size applied) and the image size it implies, if any."""

    preset: DiTPreset
    img_size: int | None


def resolve_model_name(name: str) -> ModelSpec:
    """Map a preset name ("DiT-XL/2", "DiT-tiny") or Hub name ("facebook/DiT-XL-2-256") to its preset."""
    if name in DIT_MODELS:
        return ModelSpec(DIT_MODELS[name], None)
    m = _NAME_RE.match(name)
    if m is None:
        known = sorted(DIT_MODELS) + list(HUB_CHECKPOINTS)
        raise ValueError(f"unknown DiT model {name!r}; known: {known} (other patch sizes: e.g. 'DiT-B/4')")
    family, patch = m["family"].upper(), int(m["patch"])
    preset = dataclasses.replace(DIT_MODELS[f"DiT-{family}/2"], name=f"DiT-{family}/{patch}", patch_size=patch)
    img = int(m["img"]) if m["img"] else None
    if m["hub"] and img is None:
        raise ValueError(f"Hub name {name!r} lacks the image size suffix, e.g. 'facebook/DiT-{family}-{patch}-256'")
    return ModelSpec(preset, img)


def hub_checkpoint_for(config: dict) -> str | None:
    """The Hub repo whose published DiT has exactly this config (as built by ``build_dit_config``), if any."""
    return next((repo for repo in HUB_CHECKPOINTS if build_dit_config(repo) == config), None)


def build_dit_config(
    model: str | DiTPreset = "DiT-XL/2",
    img_size: int | None = None,
    patch_size: int | None = None,
    in_channels: int = LATENT_CHANNELS,
    num_classes: int | None = None,
    learn_sigma: bool = True,
) -> dict:
    """Validated kwargs for ``DiTTransformer2DModel(**kwargs)``; ``None`` arguments take the model's own values."""
    spec = ModelSpec(model, None) if isinstance(model, DiTPreset) else resolve_model_name(model)
    preset = spec.preset
    if img_size is None:
        img_size = spec.img_size or preset.img_size
    elif spec.img_size is not None and img_size != spec.img_size:
        raise ValueError(f"{model!r} is a {spec.img_size}px model but img_size={img_size} was requested")
    if patch_size is None:
        patch_size = preset.patch_size
    elif patch_size != preset.patch_size and not isinstance(model, DiTPreset):
        raise ValueError(
            f"{model!r} has patch size {preset.patch_size}, got patch_size={patch_size}; name the size "
            f"you want instead, e.g. 'DiT-XL/{patch_size}'"
        )
    num_classes = preset.num_classes if num_classes is None else num_classes
    check_latent_channels(in_channels)
    if patch_size < 1 or img_size < 1 or img_size % (VAE_DOWNSAMPLE * patch_size):
        raise ValueError(
            f"img_size={img_size} must be a positive multiple of {VAE_DOWNSAMPLE}*patch_size="
            f"{VAE_DOWNSAMPLE * patch_size}: the VAE downsamples {VAE_DOWNSAMPLE}x and the latent must split into "
            f"{patch_size}x{patch_size} patches"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return {
        "num_attention_heads": preset.num_attention_heads,
        "attention_head_dim": preset.attention_head_dim,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if learn_sigma else in_channels,
        "num_layers": preset.num_layers,
        "dropout": preset.dropout,
        "attention_bias": preset.attention_bias,
        "sample_size": img_size // VAE_DOWNSAMPLE,
        "patch_size": patch_size,
        "activation_fn": preset.activation_fn,
        "num_embeds_ada_norm": num_classes,
        "norm_type": preset.norm_type,
        "norm_elementwise_affine": preset.norm_elementwise_affine,
        "norm_eps": preset.norm_eps,
    }


def check_latent_channels(in_channels: int) -> None:
    """Reject channel counts other than the SD VAE's 4 latent channels, with the fix for RGB inputs."""
    if in_channels == 3:
        raise ValueError(
            "DiT works on 4-channel VAE latents, not 3-channel RGB images: encode RGB with "
            "memory_test.diffusion.vae.rgb_to_latent / diffusers AutoencoderKL first ((B,3,H,W) -> (B,4,H/8,W/8))"
        )
    if in_channels != LATENT_CHANNELS:
        raise ValueError(f"DiT presets take {LATENT_CHANNELS}-channel SD VAE latents, got in_channels={in_channels}")


@dataclass(frozen=True)
class DiTFacts:
    """Size facts of one config: parameter counts and tokens per sample."""

    num_params: int
    # As one shared timestep/label embedder (the DiT paper's model; diffusers keeps one per block).
    num_params_shared_embedder: int
    embedder_params_per_block: int
    tokens_per_sample: int
    hidden_size: int
    num_layers: int


def dit_facts(config: dict) -> DiTFacts:
    """Parameter counts of ``DiTTransformer2DModel(**config)`` by arithmetic (no model is built)."""
    d, layers = config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"]
    p, c_in = config["patch_size"], config["in_channels"]
    c_out = config.get("out_channels") or c_in
    bias = int(config.get("attention_bias", True))
    linear = lambda i, o, b=1: i * o + b * o
    # Stock diffusers always adds the null-class row (it builds the embedders with dropout 0.1).
    embedder = linear(TIMESTEP_FREQ_DIM, d) + linear(d, d) + (config["num_embeds_ada_norm"] + 1) * d
    block = embedder + linear(d, 6 * d) + 3 * linear(d, d, bias) + linear(d, d) + linear(d, 4 * d) + linear(4 * d, d)
    if config.get("norm_elementwise_affine"):
        block += 2 * d  # norm3 before the MLP (norm2 exists only with cross-attention)
    head = linear(c_in * p * p, d) + linear(d, 2 * d) + linear(d, p * p * c_out)
    total = layers * block + head
    return DiTFacts(
        num_params=total,
        num_params_shared_embedder=total - (layers - 1) * embedder,
        embedder_params_per_block=embedder,
        tokens_per_sample=(config["sample_size"] // p) ** 2,
        hidden_size=d,
        num_layers=layers,
    )
