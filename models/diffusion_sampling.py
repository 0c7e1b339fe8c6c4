"""Sampling the diffusion denoisers (models/diffusion.py): DPM-Solver++ or DDIM, guidance,
thresholding, the fixed super-res augmentation level, SDEdit img2img.

Samplers are diffusers schedulers on the training schedule's betas. Guidance is
(1 + t) out_c - t out_u (t = 0 off, as in the masked family), the conditional and unconditional
passes as one batch; a negative prompt replaces the null text. Pixel-space sampling thresholds the
predicted x0 through the scheduler: dynamic (Imagen: s = percentile of |x0| per sample, clip to
[-s, s] and divide by s when s > 1) or static (clip to [-1, 1]).

Deterministic for a seed: image i's noise comes from its own generator seeded with seeds[i].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from models.diffusion import DiffusionModel, DiffusionSpec, augmentation_step, noise_low_res, null_text, training_schedule

SAMPLERS = ("dpm", "ddim")
THRESHOLDING = ("dynamic", "static", "none")
UNBOUNDED = 1e6  # dynamic thresholding's upper bound on s: Imagen has none


@dataclass(frozen=True)
class DiffusionSampler:
    sampler: str = "dpm"
    steps: int = 20
    guidance: float = 0.0  # (1 + t) out_c - t out_u; 0 = off
    thresholding: str = "none"  # "dynamic" | "static" | "none" (pixel space only)
    percentile: float = 0.995

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps must be a positive integer, got {self.steps!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if self.thresholding not in THRESHOLDING:
            raise ValueError(f"thresholding must be one of {THRESHOLDING}, got {self.thresholding!r}")

    def replace(self, **changes) -> DiffusionSampler:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def sampling_schedule(spec: DiffusionSpec, settings: DiffusionSampler):
    """A fresh diffusers sampler (they are stateful) on the training schedule's betas."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    # static clipping is thresholding with s pinned to 1: clip x0 to [-1, 1]
    threshold = {"dynamic": dict(thresholding=True, dynamic_thresholding_ratio=settings.percentile,
                                 sample_max_value=UNBOUNDED),
                 "static": dict(thresholding=True, dynamic_thresholding_ratio=settings.percentile, sample_max_value=1.0),
                 "none": dict(thresholding=False)}[settings.thresholding]
    # "leading" spacing from step 1 (Stable Diffusion's setting): the first step is not at the schedule's
    # very end, where alpha ~ 0 turns any epsilon error into a huge x0 error (cosine schedule above all)
    common = dict(num_train_timesteps=spec.train_timesteps, beta_schedule=spec.beta_schedule,
                  prediction_type=spec.prediction, timestep_spacing="leading", steps_offset=1, **threshold)
    if settings.sampler == "ddim":
        schedule = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    else:
        # and lambda(t) clipped on the cosine schedule, for step counts that reach its end (diffusers' advice)
        clip = -5.1 if spec.beta_schedule == "squaredcos_cap_v2" else -float("inf")
        schedule = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", lambda_min_clipped=clip, **common)
    schedule.set_timesteps(settings.steps)
    return schedule


def _seeded_normal(shape: tuple[int, ...], seeds: list[int], offset: int = 0) -> Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + offset)) for s in seeds])


@torch.no_grad()
def sample(model: DiffusionModel, text: Tensor, text_mask: Tensor, settings: DiffusionSampler, seeds: list[int],
           negative_text: Tensor | None = None, negative_mask: Tensor | None = None, low_res: Tensor | None = None,
           aug_level: float = 0.0, init: Tensor | None = None, strength: float = 1.0,
           trace: list | None = None) -> Tensor:
    """Samples [B,C,S,S] in model space (latents normalised by the spec's shift/scale: see to_latents).

    init + strength < 1: SDEdit img2img: init is noised to the `strength` point of the schedule and
    denoised from there. trace: if a list, the predicted x0 of every step is appended (tests)."""
    spec = model.spec
    B = text.shape[0]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} prompts")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"img2img strength must lie in (0, 1], got {strength}")
    device = next(model.parameters()).device
    schedule = sampling_schedule(spec, settings)
    shape = (spec.channels_in, spec.size, spec.size)
    x = _seeded_normal(shape, seeds).to(device)
    timesteps = schedule.timesteps
    if init is not None and strength < 1.0:
        start = min(int(round(settings.steps * (1.0 - strength))), settings.steps - 1)
        timesteps = timesteps[start * schedule.order:]
        if hasattr(schedule, "set_begin_index"):
            schedule.set_begin_index(start * schedule.order)
        x = schedule.add_noise(init.to(device), x, timesteps[:1].repeat(B))
    aug = None
    if spec.is_superres:
        if low_res is None:
            raise ValueError("super-res sampling needs the low-res images")
        step = augmentation_step(spec, aug_level)
        aug = torch.full((B,), step, dtype=torch.long, device=device)
        # the fixed sampling level (Imagen); the noise is seeded per image, offset from the sample noise
        low_res = noise_low_res(training_schedule(spec), low_res.to(device), aug,
                                _seeded_normal(tuple(low_res.shape[1:]), seeds, offset=7_777_777).to(device))
    guided = settings.guidance > 0
    if guided:
        if negative_text is None:
            negative_text, negative_mask = null_text(text, text_mask)
        cond_text = torch.cat([text, negative_text]).to(device)
        cond_mask = torch.cat([text_mask, negative_mask]).to(device)
    else:
        cond_text, cond_mask = text.to(device), text_mask.to(device)
    for t in timesteps:
        x_in = schedule.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in, x_in])
        steps_t = torch.full((x_in.shape[0],), int(t), dtype=torch.long, device=device)
        lr = low_res if not guided or low_res is None else torch.cat([low_res, low_res])
        au = aug if not guided or aug is None else torch.cat([aug, aug])
        out = model(x_in, steps_t, cond_text, cond_mask, lr, au).float()
        if guided:
            cond, uncond = out.chunk(2)
            out = (1 + settings.guidance) * cond - settings.guidance * uncond
        result = schedule.step(out, t, x)
        x = result.prev_sample
        if trace is not None:
            trace.append(getattr(result, "pred_original_sample", None))
    return x
