"""Diffusion generators (Imagen, PixArt-alpha, XGen-Image-1): denoisers, schedules, training loss, sampling.

One `DiffusionModel` covers the family's two roles, built from diffusers networks:

    base (latent):  x_t [B,C,g,g] KL latents --DiT (PixArtTransformer2DModel) or U-Net--> eps | v
    super-res (pixel, Imagen): x_t [B,3,R,R] ++ upsample(noised low-res [B,3,r,r]) --U-Net--> eps | v,
                    conditioned on the augmentation level of the low-res input

Text conditioning: the frozen encoder's per-token embeddings [B,L,D] through cross-attention (PixArt:
between self-attention and MLP, its output projection zero-initialised; U-Net: the lowest-resolution
levels and the middle block, as Imagen's Efficient U-Net), plus, for the U-Net, the masked mean of the text added to the time embedding (Imagen). The
DiT's time conditioning is PixArt's adaLN-single: one shared time MLP, a learned table per block.

Null text (classifier-free guidance, unconditional phases): all-zero embeddings with only the first
position attended, the same tensor in training and sampling.

The training schedule is diffusers' DDPMScheduler (epsilon or v-prediction targets); sampling is
in models/diffusion_sampling.py (kept apart: changing a sampler must not invalidate training
checkpoints, whose fingerprint digests this file).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.weights import directory_digest, load_saved, read_meta, save_module, spec_from_dict

BACKBONES = ("dit", "unet")
PREDICTIONS = ("epsilon", "v_prediction")
FORMAT = "cascade-diffusion"
FORMAT_VERSION = 1
WEIGHTS_FILE = "diffusion.safetensors"
SPEC_FILE = "diffusion.json"
AUG_FEATURES = 32  # sinusoidal features of the super-res augmentation level


@dataclass(frozen=True)
class DiffusionSpec:
    """Typed architecture of one denoiser; saved next to its weights."""

    backbone: str  # "dit" | "unet"
    channels_in: int  # latent channels (base) or 3 (pixel super-res)
    size: int  # sample side: the latent grid (base) or the output resolution (super-res)
    text_dim: int
    text_length: int
    width: int = 0  # dit
    depth: int = 0
    heads: int = 0
    patch_size: int = 1
    unet_channels: tuple[int, ...] = ()  # unet
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_groups: int = 8
    attention_levels: int = 1  # the lowest-resolution levels with self- and cross-attention
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction: str = "epsilon"
    low_res: int = 0  # > 0: a pixel super-res model conditioned on a low_res x low_res image
    latent_shift: float = 0.0  # base: the model sees (latent - shift) * scale (unit variance)
    latent_scale: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "unet_channels", tuple(self.unet_channels))

        def bad(msg: str) -> ValueError:
            return ValueError(f"diffusion spec: {msg}")

        if self.backbone not in BACKBONES:
            raise bad(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.prediction not in PREDICTIONS:
            raise bad(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.backbone == "dit":
            if self.low_res:
                raise bad("the pixel super-res model is a U-Net (backbone: unet)")
            if self.width <= 0 or self.depth <= 0 or self.heads <= 0 or self.width % self.heads:
                raise bad(f"dit width {self.width} must be a positive multiple of heads {self.heads}, depth > 0")
            if self.size % self.patch_size:
                raise bad(f"latent grid {self.size} is not a multiple of patch_size {self.patch_size}")
        else:
            levels = len(self.unet_channels)
            if not 0 <= self.attention_levels <= levels:
                raise bad(f"attention_levels {self.attention_levels} must lie in [0, {levels}] (the unet's levels)")
            if levels < 1 or self.size % (2 ** (levels - 1)):
                raise bad(f"sample side {self.size} must halve {levels - 1} times (unet channels {list(self.unet_channels)})")
            for c in self.unet_channels:
                if c % self.norm_groups or c % self.attention_head_dim:
                    raise bad(f"unet width {c} must be a multiple of norm_groups {self.norm_groups} and "
                              f"attention_head_dim {self.attention_head_dim}")
        if self.low_res and (self.low_res > self.size):
            raise bad(f"low-res side {self.low_res} exceeds the output side {self.size}")

    @property
    def is_superres(self) -> bool:
        return self.low_res > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet_channels"] = list(self.unet_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionSpec:
        return spec_from_dict(cls, d, "diffusion")


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features [B, dim] of integer levels t [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def pooled_text(text: Tensor, text_mask: Tensor) -> Tensor:
    """Masked mean over tokens: [B,L,D], [B,L] -> [B,D] (Imagen's pooled embedding)."""
    weights = text_mask.float()[..., None]
    return (text * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def null_text(like: Tensor, like_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The null condition: zeros [B,L,D] with only position 0 attended."""
    mask = torch.zeros_like(like_mask)
    mask[:, 0] = True
    return torch.zeros_like(like), mask


def drop_text(text: Tensor, text_mask: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
    """Replace the rows where dropped [B] is True with the null condition."""
    empty, empty_mask = null_text(text, text_mask)
    keep = ~dropped
    return (torch.where(keep[:, None, None], text, empty),
            torch.where(keep[:, None], text_mask, empty_mask))


class DiffusionModel(nn.Module):
    """A denoiser: (x_t, t, text, low-res, augmentation level) -> the spec's prediction target."""

    def __init__(self, spec: DiffusionSpec):
        super().__init__()
        self.spec = spec
        self.net = _build_dit(spec) if spec.backbone == "dit" else _build_unet(spec)

    def forward(self, x_t: Tensor, t: Tensor, text: Tensor, text_mask: Tensor, low_res: Tensor | None = None,
                aug_level: Tensor | None = None) -> Tensor:
        s = self.spec
        if x_t.shape[1:] != (s.channels_in, s.size, s.size):
            raise ValueError(f"diffusion model expects samples [B,{s.channels_in},{s.size},{s.size}], "
                             f"got {list(x_t.shape)}")
        bias_mask = text_mask.to(x_t.dtype)  # diffusers turns a 2-D 0/1 mask into an attention bias
        if s.backbone == "dit":
            return self.net(x_t, encoder_hidden_states=text, timestep=t, encoder_attention_mask=bias_mask,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        sample, extra = x_t, pooled_text(text, text_mask)  # [B,D]
        if s.is_superres:
            if low_res is None or aug_level is None:
                raise ValueError("the super-res model needs the low-res image and its augmentation level")
            up = F.interpolate(low_res, size=(s.size, s.size), mode="bilinear", align_corners=False)  # [B,3,R,R]
            sample = torch.cat([x_t, up], dim=1)
            extra = torch.cat([extra, timestep_features(aug_level, AUG_FEATURES)], dim=-1)
        return self.net(sample, t, encoder_hidden_states=text, encoder_attention_mask=bias_mask,
                        class_labels=extra.to(x_t.dtype), return_dict=False)[0]


def _build_dit(spec: DiffusionSpec) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    net = PixArtTransformer2DModel(
        num_attention_heads=spec.heads, attention_head_dim=spec.width // spec.heads, in_channels=spec.channels_in,
        out_channels=spec.channels_in, num_layers=spec.depth, cross_attention_dim=spec.width,
        sample_size=spec.size, patch_size=spec.patch_size, caption_channels=spec.text_dim,
        norm_type="ada_norm_single", num_embeds_ada_norm=spec.train_timesteps, use_additional_conditions=False,
        interpolation_scale=1)
    for block in net.transformer_blocks:  # PixArt-alpha: cross-attention starts as the identity path
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    return net


def _build_unet(spec: DiffusionSpec) -> nn.Module:
    from diffusers import UNet2DConditionModel

    levels = len(spec.unet_channels)
    plain = levels - spec.attention_levels  # Imagen's Efficient U-Net: no attention at the high resolutions
    extra_dim = spec.text_dim + (AUG_FEATURES if spec.is_superres else 0)
    return UNet2DConditionModel(
        sample_size=spec.size, in_channels=spec.channels_in + (3 if spec.is_superres else 0), out_channels=spec.channels_in, block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * spec.attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * spec.attention_levels + ("UpBlock2D",) * plain,
        mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=spec.norm_groups,
        attention_head_dim=spec.attention_head_dim, cross_attention_dim=spec.unet_channels[-1],
        encoder_hid_dim=spec.text_dim, encoder_hid_dim_type="text_proj",
        # Imagen: the pooled text (and, for super-res, the augmentation level) joins the time embedding
        class_embed_type="projection", projection_class_embeddings_input_dim=extra_dim)


# --- schedules --------------------------------------------------------------------------------

def training_schedule(spec: DiffusionSpec):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=spec.train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type=spec.prediction, clip_sample=False)


def augmentation_step(spec: DiffusionSpec, level: float) -> int:
    """A noise-augmentation level in [0, 1] as a training-schedule timestep."""
    return int(round(level * (spec.train_timesteps - 1)))


def noise_low_res(schedule, low_res: Tensor, steps: Tensor, noise: Tensor) -> Tensor:
    """Imagen noise conditioning augmentation: q(z_s | x) at step s per sample (s = 0: almost clean)."""
    return schedule.add_noise(low_res, noise, steps)


# --- training ---------------------------------------------------------------------------------

@dataclass
class LossParts:
    loss: Tensor
    timesteps: Tensor  # [B] diffusion steps drawn
    aug_steps: Tensor | None = field(default=None)  # [B] super-res augmentation steps drawn


def diffusion_loss(model: DiffusionModel, schedule, x0: Tensor, text: Tensor, text_mask: Tensor, g: torch.Generator,
                   low_res: Tensor | None = None, aug_max: float = 0.0) -> LossParts:
    """MSE between the model output and its target (eps or v) at a random step per sample.

    x0 [B,C,S,S] in model space; super-res: low_res [B,3,r,r] is noised at a level drawn uniformly
    from [0, aug_max] of the schedule and the model is told the level."""
    B = x0.shape[0]
    T = schedule.config.num_train_timesteps
    t = torch.randint(0, T, (B,), generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if model.spec.prediction == "epsilon" else schedule.get_velocity(x0, noise, t)
    aug = None
    if model.spec.is_superres:
        top = augmentation_step(model.spec, aug_max)
        aug = (torch.rand(B, generator=g) * (top + 1)).floor().long().clamp(max=top).to(x0.device)
        low_res = noise_low_res(schedule, low_res, aug, torch.randn(low_res.shape, generator=g).to(x0.device))
    out = model(x_t, t, text, text_mask, low_res, aug)
    return LossParts(F.mse_loss(out.float(), target.float()), t, aug)


def to_latents(spec: DiffusionSpec, x: Tensor) -> Tensor:
    """Model space -> KL latents."""
    return x / spec.latent_scale + spec.latent_shift


def from_latents(spec: DiffusionSpec, latents: Tensor) -> Tensor:
    """KL latents -> model space (unit variance on the training set)."""
    return (latents - spec.latent_shift) * spec.latent_scale


# --- saving -----------------------------------------------------------------------------------

def save_diffusion(model: DiffusionModel, directory: Path, extra: dict | None = None) -> Path:
    """directory/diffusion.safetensors + directory/diffusion.json (spec and `extra`)."""
    return save_module(model, directory, fmt=FORMAT, version=FORMAT_VERSION, spec=model.spec.to_dict(),
                       weights_file=WEIGHTS_FILE, spec_file=SPEC_FILE, extra=extra)


def read_diffusion_meta(directory: Path) -> dict:
    return read_meta(Path(directory) / SPEC_FILE, fmt=FORMAT, version=FORMAT_VERSION)


def load_diffusion(directory: Path, expect: DiffusionSpec | None = None, device="cpu") -> DiffusionModel:
    """A denoiser saved by save_diffusion (safetensors only), in eval mode; one-line errors."""
    return load_saved(directory, what="diffusion model", fmt=FORMAT, version=FORMAT_VERSION,
                      spec_cls=DiffusionSpec, build=DiffusionModel, weights_file=WEIGHTS_FILE,
                      spec_file=SPEC_FILE, expect=expect, device=device)


def diffusion_digest(directory: Path) -> str:
    return directory_digest(directory, (SPEC_FILE, WEIGHTS_FILE))


def check_latent_contract(spec: DiffusionSpec, latent_channels: int, grid: int, what: str = "base diffusion model") -> None:
    """The cascade's contract: the latent model's samples are the KL tokenizer's latents."""
    if spec.is_superres:
        raise ValueError(f"{what}: expected a latent base model, got a pixel super-res model")
    if spec.channels_in != latent_channels or spec.size != grid:
        raise ValueError(f"{what}: samples [{spec.channels_in},{spec.size},{spec.size}] != the KL tokenizer's latents "
                         f"[{latent_channels},{grid},{grid}]")
