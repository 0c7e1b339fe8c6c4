"""What both cascades (models.cascade.Cascade, models.diffusion_cascade.DiffusionCascade) share:
prompts in, images out, through the frozen text encoder.

A subclass sets `text_encoder` (or None: then callers pass text embeddings), `base` (whose
spec.text_length truncates the encoder's output) and implements generate_from_text.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_text_width(dim: int | None, models: dict[str, nn.Module]) -> None:
    """Contract: every model reads text of the encoder's width (dim None: not known, not checked)."""
    for name, model in models.items():
        if dim is not None and model.spec.text_dim != dim:
            raise ValueError(f"{name} reads text of width {model.spec.text_dim}, the text encoder gives {dim}")


class TextToImage(nn.Module):
    text_encoder: nn.Module | None
    base: nn.Module

    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        if self.text_encoder is None:
            raise ValueError("this cascade has no text encoder: pass text embeddings to generate_from_text")
        emb, mask = self.text_encoder.encode(list(prompts))  # [B,L,D], [B,L]
        length = self.base.spec.text_length
        return emb[:, :length], mask[:, :length]

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, negative_prompt: str | None = None,
                 guidance: float | None = None, steps: int | None = None,
                 superres_guidance: float | None = None, superres_steps: int | None = None) -> Tensor:
        """Images [B, 3, R, R] in [-1, 1], image i drawn with seed + i."""
        text, mask = self.encode_text(prompts)
        neg = self.encode_text([negative_prompt] * len(prompts)) if negative_prompt else (None, None)
        return self.generate_from_text(text, mask, seed, *neg, guidance=guidance, steps=steps,
                                       superres_guidance=superres_guidance, superres_steps=superres_steps)

    def generate_from_text(self, text: Tensor, mask: Tensor, seed: int = 0, negative_text: Tensor | None = None,
                           negative_mask: Tensor | None = None, **settings) -> Tensor:
        raise NotImplementedError
