"""Rejection sampling (XGen-Image-1): draw N candidates per prompt, keep the one a scorer likes best.

    prompts' text [P, L, D], mask [P, L]
      --generate, candidate j of prompt i with seed + i*N + j--> candidates [P*N, 3, R, R] (in batches)
      --score(images, prompt indices)--> scores [P, N]
      --argmax per prompt (first on ties)--> images [P, 3, R, R]

Candidates go through `generate` in batches of `batch_size` (prompt-major), and only the best image so
far per prompt is kept, so memory does not grow with N. Every candidate has its own seed, so the
result does not depend on the batch size, and N = 1 reproduces plain generation (image i from
seed + i). Family-agnostic: `generate` is any cascade's generate_from_text with its settings bound.

Pure torch; the scorers live in components.preference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# generate(text [B,L,D], mask [B,L], seeds list[int]) -> images [B,3,R,R] in [-1,1]
GenerateFn = Callable[[Tensor, Tensor, list[int]], Tensor]
# score(images [B,3,R,R] in [-1,1], prompt_indices [B] long) -> [B] float, higher is better
ScoreFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RejectionResult:
    images: Tensor  # [P, 3, R, R] in [-1, 1]: the best candidate per prompt
    scores: Tensor  # [P, N] float: every candidate's score
    chosen: Tensor  # [P] long: index j of the kept candidate
    seeds: Tensor  # [P, N] long: the seed candidate j of prompt i was drawn with

    @property
    def best_scores(self) -> Tensor:
        """[P]: the kept candidates' scores."""
        return self.scores.gather(1, self.chosen[:, None])[:, 0]


def candidate_seeds(seed: int, n_prompts: int, n: int) -> Tensor:
    """[P, N] long: seed + i*N + j, so no two candidates of one run share a seed."""
    return seed + torch.arange(n_prompts)[:, None] * n + torch.arange(n)[None, :]


@torch.no_grad()
def rejection_sample(generate: GenerateFn, text: Tensor, mask: Tensor, n: int, score: ScoreFn, seed: int = 0,
                     batch_size: int = 16) -> RejectionResult:
    """The best of `n` candidates per prompt by `score` (see module docstring). Deterministic for a seed."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"candidates per prompt must be an integer >= 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"rejection sampling batch_size must be >= 1, got {batch_size}")
    P = text.shape[0]
    if P == 0 or mask.shape[0] != P:
        raise ValueError(f"rejection sampling needs text [P, L, D] and mask [P, L] for P >= 1 prompts, got "
                         f"{list(text.shape)} and {list(mask.shape)}")
    seeds = candidate_seeds(seed, P, n)  # [P,N]
    flat_prompt = torch.arange(P).repeat_interleave(n)  # [P*N]: candidate k belongs to prompt k // N
    flat_seed = seeds.flatten()
    scores = torch.full((P, n), float("nan"))
    best: Tensor | None = None  # [P,3,R,R], allocated from the first batch's shape
    for start in range(0, P * n, batch_size):
        idx = flat_prompt[start:start + batch_size]  # [b]
        images = generate(text[idx.to(text.device)], mask[idx.to(mask.device)],
                          [int(s) for s in flat_seed[start:start + batch_size]])  # [b,3,R,R]
        if images.ndim != 4 or images.shape[0] != len(idx):
            raise ValueError(f"generate returned {list(images.shape)} for {len(idx)} candidates")
        batch_scores = torch.as_tensor(score(images, idx)).detach().float().cpu().flatten()  # [b]
        if batch_scores.shape != (len(idx),):
            raise ValueError(f"the scorer returned {batch_scores.numel()} scores for {len(idx)} images")
        if not torch.isfinite(batch_scores).all():
            raise ValueError("the scorer returned a non-finite score; cannot rank the candidates")
        if best is None:
            best = torch.empty((P, *images.shape[1:]), dtype=images.dtype, device=images.device)
        for k in range(len(idx)):
            i, j = divmod(start + k, n)
            scores[i, j] = batch_scores[k]
            # strictly better only: on a tie the earlier candidate (lower seed) stays, whatever the batching
            if j == 0 or batch_scores[k] > scores[i, :j].max():
                best[i] = images[k]
    chosen = scores.argmax(dim=1)  # first maximum: the same candidate the loop kept
    return RejectionResult(best, scores, chosen, seeds)
