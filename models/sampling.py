"""Iterative parallel decoding (MaskGIT / Muse) with classifier-free guidance and zero-shot editing.

Start from a fully masked token map (or, for editing, from given tokens with a region masked).
At step s of S: predict every masked token, sample one per position, keep the most confident
ones and re-mask the rest, so that cos(pi/2 * (s+1)/S) of the masked positions stay masked
(the cosine schedule); the last step fills everything. Temperatures anneal linearly to 0.

Guidance (Muse): l_g = (1 + t) l_c - t l_u, with t rising linearly from 0 at the first step to
the guidance scale at the last. l_u comes from the null context, or from a negative prompt's
text when one is given. The conditional and unconditional passes run as one batch.

Deterministic for a seed: every random draw of image i comes from its own generator seeded with
`seeds[i]`, so a prompt's result does not depend on which other prompts share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.masked_transformer import MaskedTransformer


@dataclass(frozen=True)
class SamplerSettings:
    steps: int
    guidance: float
    temperature: float = 1.0  # token sampling temperature at the first step, annealed to 0
    choice_temperature: float = 4.5  # confidence noise (MaskGIT) at the first step, annealed to 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps must be a positive integer, got {self.steps!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.temperature < 0 or self.choice_temperature < 0:
            raise ValueError("temperatures must be >= 0")

    def replace(self, **changes) -> SamplerSettings:
        from dataclasses import replace

        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def guidance_at(step: int, steps: int, scale: float) -> float:
    """t rises linearly from 0 (first step) to `scale` (last step)."""
    return scale if steps == 1 else scale * step / (steps - 1)


def masked_after(step: int, steps: int, n_regenerate: Tensor) -> Tensor:
    """How many of the regenerated positions stay masked after `step` (cosine schedule), [B] long."""
    ratio = math.cos(0.5 * math.pi * (step + 1) / steps)
    return (n_regenerate.float() * ratio).floor().long()


def _gumbel(shape: tuple[int, ...], generators: list[torch.Generator], device) -> Tensor:
    """Gumbel(0, 1) noise [B, *shape], row i drawn from generators[i]."""
    u = torch.stack([torch.rand(shape, generator=g) for g in generators]).to(device)  # [B,*shape]
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def decode(
    model: MaskedTransformer,
    text: Tensor,
    text_mask: Tensor,
    settings: SamplerSettings,
    seeds: list[int],
    cond_tokens: Tensor | None = None,
    negative_text: Tensor | None = None,
    negative_mask: Tensor | None = None,
    init_tokens: Tensor | None = None,
    regenerate: Tensor | None = None,
) -> Tensor:
    """Generate token maps [B, N] (N = grid * grid, row-major).

    text [B, L, D] + text_mask [B, L]: the prompts. cond_tokens [B, M]: the low-res token map
    (super-res models). negative_text/negative_mask [B, L, D]/[B, L]: replace the unconditional
    logits. init_tokens [B, N] + regenerate [B, N] bool: zero-shot editing, only the True
    positions are generated (inpainting: a region; outpainting: everything outside it).
    """
    s = model.spec
    B, N, K = text.shape[0], s.n_tokens, s.codebook_size
    device = text.device
    if len(seeds) != B:
        raise ValueError(f"need one seed per prompt: {len(seeds)} seeds for {B} prompts")
    if (init_tokens is None) != (regenerate is None):
        raise ValueError("editing needs both init_tokens and regenerate (the positions to generate)")
    if regenerate is None:
        regenerate = torch.ones(B, N, dtype=torch.bool, device=device)
        tokens = torch.full((B, N), s.mask_id, dtype=torch.long, device=device)
    else:
        if init_tokens.shape != (B, N) or regenerate.shape != (B, N):
            raise ValueError(f"init_tokens and regenerate must be [{B}, {N}], got {list(init_tokens.shape)} "
                             f"and {list(regenerate.shape)}")
        tokens = torch.where(regenerate, torch.full_like(init_tokens, s.mask_id), init_tokens.long())
    generators = make_generators(seeds)
    n_regenerate = regenerate.sum(dim=1)  # [B]

    guided = settings.guidance > 0
    if guided:
        if negative_text is None:
            negative_text, negative_mask = torch.zeros_like(text), torch.zeros_like(text_mask)  # null context only
        both_text = torch.cat([text, negative_text])  # [2B,L,D]
        both_mask = torch.cat([text_mask, negative_mask])
        both_cond = None if cond_tokens is None else torch.cat([cond_tokens, cond_tokens])

    for step in range(settings.steps):
        progress = (step + 1) / settings.steps
        if guided:
            logits_c, logits_u = model(torch.cat([tokens, tokens]), both_text, both_mask, both_cond).chunk(2)
            t = guidance_at(step, settings.steps, settings.guidance)
            logits = (1 + t) * logits_c - t * logits_u  # [B,N,K]
        else:
            logits = model(tokens, text, text_mask, cond_tokens)
        logits = logits.float()
        temperature = settings.temperature * (1 - step / settings.steps)
        if temperature > 0:
            sampled = (logits / temperature + _gumbel((N, K), generators, device)).argmax(-1)  # [B,N]
        else:
            sampled = logits.argmax(-1)
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, sampled[..., None]).squeeze(-1)  # [B,N]
        still_masked = tokens == s.mask_id
        sampled = torch.where(still_masked, sampled, tokens)
        noise = settings.choice_temperature * (1 - progress)
        confidence = log_probs + (noise * _gumbel((N,), generators, device) if noise > 0 else 0)
        confidence = torch.where(still_masked, confidence, torch.full_like(confidence, math.inf))  # kept stay kept
        n_keep_masked = masked_after(step, settings.steps, n_regenerate)  # [B]
        # never fewer newly decoded than one per step while anything is masked
        n_keep_masked = torch.minimum(n_keep_masked, (still_masked.sum(1) - 1).clamp_min(0))
        ranks = confidence.argsort(dim=1).argsort(dim=1)  # [B,N], 0 = least confident
        remask = ranks < n_keep_masked[:, None]
        tokens = torch.where(remask, torch.full_like(sampled, s.mask_id), sampled)
    assert not (tokens == s.mask_id).any(), "decoding left masked tokens"
    return tokens


def region_to_tokens(region: Tensor, grid: int) -> Tensor:
    """A pixel mask [B, H, W] bool -> token mask [B, grid*grid]: a token is in the region when any
    pixel of its patch is."""
    B, H, W = region.shape
    if H % grid or W % grid:
        raise ValueError(f"mask size {H}x{W} is not a multiple of the token grid {grid}")
    patches = region.view(B, grid, H // grid, grid, W // grid).any(dim=4).any(dim=2)  # [B,grid,grid]
    return patches.flatten(1)
