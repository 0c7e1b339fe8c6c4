"""The diffusion cascade by composition (XGen-Image-1: latent base + pixel upsampler; Imagen SR):

    prompts --frozen text encoder--> text [B, L, D], mask [B, L]
            --base model (DiT/U-Net, DPM-Solver/DDIM, guidance)--> latents [B, C, g, g]
            --KL-VAE decoder--> low-res images [B, 3, r, r]
            --pixel super-res (noise-augmented low-res at a fixed level, dynamic thresholding)--> [B, 3, R, R]

Contracts asserted at construction: the base model's samples are the KL-VAE's latents (channels and
grid), the super-res model's low-res side is the VAE's resolution, and both read the text
encoder's width. Same inference interface as models.cascade.Cascade (components/cascades.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.diffusion import DiffusionModel, check_latent_contract, from_latents, to_latents
from models.diffusion_sampling import DiffusionSampler, sample
from models.text_to_image import TextToImage, check_text_width
from models.tokenizer import ImageTokenizer

SUPERRES_SEED_OFFSET = 1_000_003  # the super-res noise is independent of the base noise


@dataclass(frozen=True)
class DiffusionCascadeSettings:
    base: DiffusionSampler
    superres: DiffusionSampler
    aug_level: float  # the fixed noise-augmentation level of the low-res input at sampling (Imagen)


class DiffusionCascade(TextToImage):
    def __init__(self, text_encoder: nn.Module | None, base: DiffusionModel, superres: DiffusionModel,
                 vae: ImageTokenizer, settings: DiffusionCascadeSettings, text_dim: int | None = None):
        super().__init__()
        if vae.is_vq:
            raise ValueError("the diffusion cascade needs a KL-VAE tokenizer (kind: kl), not a VQGAN")
        check_latent_contract(base.spec, vae.spec.latent_channels, vae.spec.grid)
        if not superres.spec.is_superres:
            raise ValueError("diffusion cascade: `superres` must be a pixel super-res model")
        if superres.spec.low_res != vae.spec.resolution:
            raise ValueError(f"super-res model takes {superres.spec.low_res}px inputs, the base cascade makes "
                             f"{vae.spec.resolution}px images (the KL-VAE's resolution)")
        check_text_width(text_encoder.dim if text_encoder is not None else text_dim,
                         {"base model": base, "super-res model": superres})
        self.text_encoder, self.base, self.superres, self.vae = text_encoder, base, superres, vae
        self.settings = settings

    @property
    def resolution(self) -> int:
        return self.superres.spec.size

    @torch.no_grad()
    def generate_from_text(self, text: Tensor, mask: Tensor, seed: int = 0, negative_text: Tensor | None = None,
                           negative_mask: Tensor | None = None, guidance: float | None = None,
                           steps: int | None = None, superres_guidance: float | None = None,
                           superres_steps: int | None = None, seeds: list[int] | None = None) -> Tensor:
        seeds = seeds if seeds is not None else [seed + i for i in range(text.shape[0])]
        low = self.base_images(text, mask, seeds, negative_text, negative_mask, guidance=guidance, steps=steps)
        return self.upsample(text, mask, low, seeds, negative_text, negative_mask, guidance=superres_guidance,
                             steps=superres_steps)

    def base_images(self, text: Tensor, mask: Tensor, seeds: list[int], negative_text: Tensor | None = None,
                    negative_mask: Tensor | None = None, guidance: float | None = None, steps: int | None = None,
                    init: Tensor | None = None, strength: float = 1.0) -> Tensor:
        """Low-res images [B,3,r,r] in [-1,1]: base latents decoded by the KL-VAE."""
        settings = self.settings.base.replace(guidance=guidance, steps=steps)
        z = sample(self.base, text, mask, settings, seeds, negative_text, negative_mask, init=init,
                   strength=strength)  # [B,C,g,g] model space
        return self.vae.decode(to_latents(self.base.spec, z)).clamp(-1, 1)

    def upsample(self, text: Tensor, mask: Tensor, low: Tensor, seeds: list[int], negative_text: Tensor | None = None,
                 negative_mask: Tensor | None = None, guidance: float | None = None,
                 steps: int | None = None) -> Tensor:
        settings = self.settings.superres.replace(guidance=guidance, steps=steps)
        high = sample(self.superres, text, mask, settings, [s + SUPERRES_SEED_OFFSET for s in seeds], negative_text,
                      negative_mask, low_res=low, aug_level=self.settings.aug_level)
        return high.clamp(-1, 1)

    @torch.no_grad()
    def img2img(self, prompts: list[str], images: Tensor, strength: float, seed: int = 0,
                guidance: float | None = None) -> Tensor:
        """SDEdit: images [B,3,R,R] in [-1,1] re-generated from the `strength` point of the base schedule.

        The images are downscaled to the VAE's side and encoded; their latents are noised and denoised
        under the prompts, decoded, and upsampled again by the super-res model."""
        R, r = self.resolution, self.vae.spec.resolution
        if images.shape[-2:] != (R, R):
            raise ValueError(f"img2img images must be {R}x{R}, got {list(images.shape)}")
        text, mask = self.encode_text(prompts)
        seeds = [seed + i for i in range(text.shape[0])]
        low = F.interpolate(images, size=(r, r), mode="area")  # [B,3,r,r]
        init = from_latents(self.base.spec, self.vae.encode(low))  # [B,C,g,g] model space
        low = self.base_images(text, mask, seeds, guidance=guidance, init=init, strength=strength)
        return self.upsample(text, mask, low, seeds)
