"""The Muse cascade by composition: text -> base tokens -> super-res tokens -> decoder -> pixels.

    prompts --frozen text encoder--> text [B, L, D], mask [B, L]
            --base generator (decode, base settings)--> base tokens [B, g*g]
            --super-res generator (decode, conditioned on base tokens)--> tokens [B, G*G]
            --super-res tokenizer decoder--> images [B, 3, R, R] in [-1, 1]

The contracts between the parts are asserted at construction: each generator's vocabulary is its
tokenizer's codebook + MASK, its grid is its tokenizer's grid, the super-res model's low-res
inputs are the base tokenizer's, and both generators read the text encoder's width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.masked_transformer import MaskedTransformer, check_tokenizer_contract
from models.sampling import SamplerSettings, decode, region_to_tokens
from models.text_to_image import TextToImage, check_text_width
from models.tokenizer import ImageTokenizer

# the super-res stage's random streams are offset from the base stage's, so the two are independent
SUPERRES_SEED_OFFSET = 1_000_003
# img2img's choice of re-masked positions draws from streams offset from the sampler's
IMG2IMG_SEED_OFFSET = 2_000_029


@dataclass(frozen=True)
class CascadeSettings:
    base: SamplerSettings
    superres: SamplerSettings


class Cascade(TextToImage):
    def __init__(self, text_encoder: nn.Module | None, base: MaskedTransformer, superres: MaskedTransformer,
                 base_tokenizer: ImageTokenizer, decoder: ImageTokenizer, settings: CascadeSettings,
                 text_dim: int | None = None):
        """decoder: the super-res tokenizer (its decoder makes the pixels; editing also uses its
        encoder); base_tokenizer: only its encoder is used, by editing."""
        super().__init__()
        if not decoder.is_vq or not base_tokenizer.is_vq:
            raise ValueError("the masked-token cascade needs vqgan tokenizers (kind: vqgan), not kl latents")
        if base.spec.is_superres or not superres.spec.is_superres:
            raise ValueError("cascade: `base` must be a base model and `superres` a super-res model")
        low = base_tokenizer.spec
        check_tokenizer_contract(base.spec, low.codebook_size, low.grid, what="base generator")
        check_tokenizer_contract(superres.spec, decoder.codebook_size, decoder.spec.grid,
                                 low.codebook_size, low.grid, what="super-res generator")
        check_text_width(text_encoder.dim if text_encoder is not None else text_dim,
                         {"base generator": base, "super-res generator": superres})
        self.text_encoder, self.base, self.superres, self.decoder = text_encoder, base, superres, decoder
        self.base_tokenizer = base_tokenizer
        self.settings = settings

    @property
    def resolution(self) -> int:
        return self.decoder.spec.resolution

    @torch.no_grad()
    def generate_from_text(self, text: Tensor, mask: Tensor, seed: int = 0, negative_text: Tensor | None = None,
                           negative_mask: Tensor | None = None, guidance: float | None = None,
                           steps: int | None = None, superres_guidance: float | None = None,
                           superres_steps: int | None = None, seeds: list[int] | None = None) -> Tensor:
        B = text.shape[0]
        seeds = seeds if seeds is not None else [seed + i for i in range(B)]
        base_settings = self.settings.base.replace(guidance=guidance, steps=steps)
        sr_settings = self.settings.superres.replace(guidance=superres_guidance, steps=superres_steps)
        low = decode(self.base, text, mask, base_settings, seeds, negative_text=negative_text,
                     negative_mask=negative_mask)  # [B, g*g]
        high = decode(self.superres, text, mask, sr_settings, [s + SUPERRES_SEED_OFFSET for s in seeds],
                      cond_tokens=low, negative_text=negative_text, negative_mask=negative_mask)  # [B, G*G]
        return self.decode_tokens(high)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        g = self.decoder.spec.grid
        return self.decoder.decode(tokens.view(-1, g, g)).clamp(-1, 1)  # [B,3,R,R]

    @torch.no_grad()
    def edit(self, prompts: list[str], images: Tensor, region: Tensor, seed: int = 0, outpaint: bool = False,
             guidance: float | None = None, steps: int | None = None) -> Tensor:
        """Zero-shot inpainting (regenerate inside `region`) or outpainting (outside it), Muse 3.3.

        images [B, 3, R, R] in [-1, 1] and region [B, R, R] bool at the super-res resolution R.
        Both token maps are edited: the base map (image downscaled, region pooled to its grid) is
        decoded first, then the super-res map conditioned on it; tokens outside the edit are kept.
        """
        R = self.resolution
        if images.shape[-2:] != (R, R) or region.shape[-2:] != (R, R):
            raise ValueError(f"images and region must be {R}x{R}, got {list(images.shape)} and {list(region.shape)}")
        text, mask = self.encode_text(prompts)
        seeds = [seed + i for i in range(text.shape[0])]
        r = self.base_tokenizer.spec.resolution
        low_images = F.interpolate(images, size=(r, r), mode="area")  # [B,3,r,r]
        low_region = F.interpolate(region[:, None].float(), size=(r, r), mode="area")[:, 0] > 0  # [B,r,r]
        plans = []
        for tokenizer, pixels, where in ((self.base_tokenizer, low_images, low_region), (self.decoder, images, region)):
            inside = region_to_tokens(where.bool(), tokenizer.spec.grid)  # [B, g*g]
            plans.append((tokenizer.encode(pixels).flatten(1), ~inside if outpaint else inside))
        (low_init, low_regen), (high_init, high_regen) = plans
        low = decode(self.base, text, mask, self.settings.base.replace(guidance=guidance, steps=steps), seeds,
                     init_tokens=low_init, regenerate=low_regen)
        high = decode(self.superres, text, mask, self.settings.superres.replace(guidance=guidance),
                      [s + SUPERRES_SEED_OFFSET for s in seeds], cond_tokens=low, init_tokens=high_init,
                      regenerate=high_regen)
        return self.decode_tokens(high)

    @torch.no_grad()
    def img2img(self, prompts: list[str], images: Tensor, strength: float, seed: int = 0,
                guidance: float | None = None) -> Tensor:
        """Re-generate a `strength` share of each image's tokens under `prompts` (region touch-ups).

        images [B, 3, R, R] in [-1, 1]. Both token maps are encoded from the image; in each, a random
        round(strength * N) positions (at least one), drawn from image i's own generator seeded with
        seed + i, are masked and decoded again as in `edit` (base first, super-res conditioned on it),
        so strength 1 is plain generation with the same seeds and small strengths keep the layout.
        """
        R = self.resolution
        if images.ndim != 4 or images.shape[1:] != (3, R, R):
            raise ValueError(f"img2img: images must be [B, 3, {R}, {R}], got {list(images.shape)}")
        if not 0 < strength <= 1:
            raise ValueError(f"img2img strength must be in (0, 1], got {strength}")
        text, mask = self.encode_text(prompts)
        B = text.shape[0]
        if images.shape[0] != B:
            raise ValueError(f"img2img: {B} prompts but {images.shape[0]} images")
        seeds = [seed + i for i in range(B)]
        r = self.base_tokenizer.spec.resolution
        low_images = F.interpolate(images, size=(r, r), mode="area")  # [B,3,r,r]
        plans = []
        # the position draws get their own streams: decode() re-seeds with `seeds`, and sharing a stream
        # would make which tokens are re-masked depend on the sampler's draws (or vice versa)
        for offset, (tokenizer, pixels) in enumerate(((self.base_tokenizer, low_images), (self.decoder, images))):
            init = tokenizer.encode(pixels).flatten(1)  # [B, g*g]
            n_tokens = init.shape[1]
            k = max(1, round(strength * n_tokens))
            regen = torch.zeros(B, n_tokens, dtype=torch.bool)
            for i, s in enumerate(seeds):
                g = torch.Generator().manual_seed(s + IMG2IMG_SEED_OFFSET * (offset + 1))
                regen[i, torch.randperm(n_tokens, generator=g)[:k]] = True
            plans.append((init, regen.to(init.device)))
        (low_init, low_regen), (high_init, high_regen) = plans
        low = decode(self.base, text, mask, self.settings.base.replace(guidance=guidance), seeds,
                     init_tokens=low_init, regenerate=low_regen)
        high = decode(self.superres, text, mask, self.settings.superres.replace(guidance=guidance),
                      [s + SUPERRES_SEED_OFFSET for s in seeds], cond_tokens=low, init_tokens=high_init,
                      regenerate=high_regen)
        return self.decode_tokens(high)
