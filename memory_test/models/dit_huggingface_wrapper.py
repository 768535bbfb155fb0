"""DiT wrapper: the stock diffusers ``DiTTransformer2DModel`` with once-per-sample label dropout and local loading."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from memory_test.models.attention import RecordingAttnProcessor, set_recording_processor
from memory_test.models.dit_presets import (
    DiTFacts,
    build_dit_config,
    check_latent_channels,
    dit_facts,
    hub_checkpoint_for,
)

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)
# Config keys that fix the architecture; a checkpoint differing in any of them is a different model.
ARCH_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "num_layers",
    "sample_size",
    "patch_size",
    "num_embeds_ada_norm",
    "activation_fn",
    "attention_bias",
    "norm_type",
    "norm_elementwise_affine",
    "norm_eps",
)


class PretrainedWeightsNotFoundError(FileNotFoundError):
    """Pretrained DiT weights were requested but are not on this machine."""


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _model_dir(path: Path) -> Path | None:
    """``path`` itself (model layout) or ``path/transformer`` (pipeline layout), whichever holds config + weights."""
    for cand in (path, path / "transformer"):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in WEIGHT_FILES):
            return cand
    return None


def find_pretrained_dir(pretrained_path: str | os.PathLike | None, hub_repo_id: str | None) -> Path:
    """Locate a local diffusers DiT model dir: ``pretrained_path`` if given, else the Hub cache (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    if pretrained_path is not None:
        found = _model_dir(Path(pretrained_path).expanduser())
        if found is None:
            raise PretrainedWeightsNotFoundError(
                f"no DiT weights under pretrained_path={str(pretrained_path)!r}: expected config.json and one of "
                f"{WEIGHT_FILES} there or in its transformer/ subfolder (save_pretrained / pipeline layout)"
            )
        return found
    if hub_repo_id is None:
        raise PretrainedWeightsNotFoundError(
            "pretrained=True but no published checkpoint matches this config and no pretrained_path was given; "
            "pass pretrained_path (a local diffusers model dir) or hub_repo_id"
        )
    cache = hub_cache_dir()
    for config_name in ("transformer/config.json", "config.json"):
        hit = try_to_load_from_cache(hub_repo_id, config_name, cache_dir=cache)
        if isinstance(hit, str) and (found := _model_dir(Path(hit).parent)) is not None:
            return found
    raise PretrainedWeightsNotFoundError(
        f"weights of {hub_repo_id} are not in the Hugging Face cache {cache} (looked for transformer/config.json and "
        f"config.json with {WEIGHT_FILES[0]} or .bin; this code never downloads). On a machine with network run "
        f"`hf download {hub_repo_id} --include 'transformer/*'` (set HF_HUB_CACHE / HF_HOME to point at that cache), "
        "or pass pretrained_path=<local dir>"
    )


def check_checkpoint_config(model_dir: Path, expected: dict) -> None:
    """Raise if the checkpoint's config.json describes another architecture than ``expected``."""
    stored = json.loads((model_dir / "config.json").read_text())
    defaults = {k: p.default for k, p in inspect.signature(DiTTransformer2DModel.__init__).parameters.items()}
    effective = {k: stored.get(k, defaults.get(k)) for k in ARCH_KEYS}
    effective["out_channels"] = effective["out_channels"] or effective["in_channels"]
    diff = [
        f"{k}: checkpoint={effective[k]!r} requested={expected[k]!r}" for k in ARCH_KEYS if effective[k] != expected[k]
    ]
    if diff:
        raise ValueError(f"checkpoint {model_dir} is not the requested DiT architecture: " + "; ".join(diff))


def load_pretrained(model_dir: Path, expected: dict) -> DiTTransformer2DModel:
    """Load a local checkpoint after checking its config; every parameter must come from the file."""
    check_checkpoint_config(model_dir, expected)
    model, info = DiTTransformer2DModel.from_pretrained(str(model_dir), local_files_only=True, output_loading_info=True)
    buffers = {name for name, _ in model.named_buffers()}
    # A checkpoint saved with the sin-cos pos-embed buffer persistent carries it; the buffer is recomputed anyway.
    unexpected = [k for k in info["unexpected_keys"] if k not in buffers]
    if info["missing_keys"] or info["mismatched_keys"] or unexpected or info["error_msgs"]:
        raise ValueError(f"checkpoint {model_dir} does not fill the model exactly: {info}")
    return model


class DiTHuggingFaceWrapper(nn.Module):
    """diffusers DiT on VAE latents returning predicted noise; all parameters trainable, nothing frozen or replaced.

    The output's learned-sigma channels ``in_channels..2*in_channels-1`` are computed by ``proj_out_2`` but get zero
    gradient from the epsilon-MSE loss (DiT trains them with a VLB term that is not used here).
    Label dropout for classifier-free guidance is drawn once per row here, so every block's embedder (and block 0's
    second use for the output head) sees the same labels; the stock per-block dropout is switched off.
    ``None`` for img_size / patch_size / num_classes means the model's own value (256 / 2 / 1000 for DiT-XL/2-256).
    """

    def __init__(
        self,
        model_name: str = "facebook/DiT-XL-2-256",
        img_size: int | None = None,
        patch_size: int | None = None,
        in_channels: int = 4,
        num_classes: int | None = None,
        pretrained: bool = False,
        use_flash_attention: bool = True,
        pretrained_path: str | os.PathLike | None = None,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        *,
        hub_repo_id: str | None = None,
    ):
        super().__init__()
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if pretrained_path is not None and not pretrained:
            raise ValueError("pretrained_path was given with pretrained=False; pass pretrained=True to load it")
        self.config = build_dit_config(model_name, img_size, patch_size, in_channels, num_classes, learn_sigma)
        self.model_name = model_name
        self.in_channels = in_channels
        self.num_classes = self.config["num_embeds_ada_norm"]
        self.class_dropout_prob = class_dropout_prob
        if pretrained:
            model_dir = find_pretrained_dir(pretrained_path, hub_repo_id or hub_checkpoint_for(self.config))
            self.model = load_pretrained(model_dir, self.config)
        else:
            self.model = DiTTransformer2DModel(**self.config)
        for block in self.model.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # the null-class row stays; dropout happens in forward
        self.attention_processor: RecordingAttnProcessor = set_recording_processor(self.model, use_flash_attention)
        self.train()  # from_pretrained leaves the diffusers model in eval mode

    @property
    def attention_backend(self) -> str:
        return self.attention_processor.backend

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def tokens_per_sample(self) -> int:
        return self.facts.tokens_per_sample

    @property
    def facts(self) -> DiTFacts:
        return dit_facts(self.config)

    @property
    def sample_size(self) -> int:
        return self.config["sample_size"]

    def drop_labels(
        self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Labels with dropped rows set to the null class: ``drop_mask`` if given, else Bernoulli when training."""
        if drop_mask is None:
            if not (self.training and self.class_dropout_prob > 0):
                return labels
            drop_mask = torch.rand(labels.shape, device=labels.device, generator=generator) < self.class_dropout_prob
        elif drop_mask.shape != labels.shape:
            raise ValueError(f"drop_mask has shape {tuple(drop_mask.shape)}, labels {tuple(labels.shape)}")
        return torch.where(drop_mask.to(device=labels.device, dtype=torch.bool), self.num_classes, labels)

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        labels: torch.Tensor,
        target_noise: torch.Tensor | None = None,
        *,
        drop_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predicted noise (B, in_channels, H, W); with ``target_noise`` also the per-sample MSE of shape (B,)."""
        timesteps = self._check_inputs(latents, timesteps, labels)
        labels = self.drop_labels(labels, drop_mask, generator)
        out = self.model(latents, timestep=timesteps, class_labels=labels, return_dict=False)[0]
        pred = out[:, : self.in_channels]
        if target_noise is None:
            return pred
        if target_noise.shape != pred.shape:
            raise ValueError(f"target_noise has shape {tuple(target_noise.shape)}, prediction {tuple(pred.shape)}")
        # bf16 autocast outputs: accumulate the loss in at least fp32.
        dtype = torch.promote_types(pred.dtype, torch.float32)
        return pred, (pred.to(dtype) - target_noise.to(dtype)).pow(2).flatten(1).mean(1)

    def _check_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Shape checks (no device sync); returns the timesteps as a (B,) tensor."""
        if latents.ndim != 4:
            raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
        batch, channels, height, width = latents.shape
        if channels != self.in_channels:
            check_latent_channels(channels)
            raise ValueError(f"latents have {channels} channels, the model takes {self.in_channels}")
        side = self.sample_size
        if (height, width) != (side, side):
            raise ValueError(
                f"latents are {height}x{width} but the model was built for {side}x{side} latents "
                f"(img_size={side * 8}); pass the matching img_size or VAE-encode images of that size"
            )
        if not torch.is_tensor(timesteps):
            timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(timesteps.shape)}")
        if labels.shape != (batch,) or labels.is_floating_point():
            raise ValueError(f"labels must be integer class ids of shape ({batch},), got {labels.dtype} {labels.shape}")
        return timesteps
