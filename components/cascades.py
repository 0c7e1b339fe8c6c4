"""The trained cascade of either generator family, loaded from the stages' outputs.

Both families expose one inference interface, which evaluation, `cascade generate`, rejection
sampling, touch-ups and the registry use without knowing the family:

    cascade.resolution                                   output side R
    cascade.encode_text(prompts) -> text [B,L,D], mask [B,L]
    cascade.generate(prompts, seed, negative_prompt, guidance, steps, superres_guidance, superres_steps)
    cascade.generate_from_text(text, mask, seeds=..., guidance=..., superres_guidance=...)   [B,3,R,R] in [-1,1]
    cascade.img2img(prompts, images [B,3,R,R], strength, seed) -> [B,3,R,R]   (touch-ups)

masked:    models.cascade.Cascade (Muse: base tokens -> super-res tokens -> decoder)
diffusion: models.diffusion_cascade.DiffusionCascade (latent DiT/U-Net -> KL decoder -> pixel SR)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from components.config import CascadeConfig
from components.errors import BadInputError


def load_for_inference(cfg: CascadeConfig, artifacts: Path):
    """The full cascade with its frozen text encoder from a DVC-layout `artifacts` folder."""
    artifacts = Path(artifacts)
    finetuned = artifacts / "decoder_ft"  # the decoder_ft stage's larger decoder, once it has run
    decoder_dir = finetuned if (finetuned / "tokenizer.json").is_file() else None
    return load_from_dirs(cfg, artifacts / "base", artifacts / "superres", artifacts / "tokenizer", decoder_dir)


def load_from_dirs(cfg: CascadeConfig, base_dir: Path, superres_dir: Path, tokenizer_dir: Path,
                   decoder_dir: Path | None = None):
    """The full cascade of cfg's family from the stages' output folders."""
    if cfg.generator.family == "diffusion":
        from components.diffusion import load_for_inference as load_diffusion

        return load_diffusion(cfg, base_dir, superres_dir, tokenizer_dir, decoder_dir)
    from components.superres import load_for_inference as load_masked

    return load_masked(cfg, base_dir, superres_dir, tokenizer_dir, decoder_dir)


def default_guidance(cfg: CascadeConfig) -> float:
    """The base model's default guidance scale for cfg's family (what evaluation reports at)."""
    sample = cfg.diffusion.base.sample if cfg.generator.family == "diffusion" else cfg.base.sample
    return float(sample.guidance)


def sampler_params(cfg: CascadeConfig) -> dict:
    """Both models' sampler settings for cfg's family (what the registered bundle records)."""
    from dataclasses import asdict

    if cfg.generator.family == "diffusion":
        d = cfg.diffusion
        return {"base": asdict(d.base.sample), "superres": asdict(d.superres.sample),
                "aug_level": d.superres.noise_aug.sample}
    return {"base": asdict(cfg.base.sample), "superres": asdict(cfg.superres.sample)}


def checked_generate(cascade) -> Callable:
    """generate(text, mask, seeds, guidance) for components.compositional.check_held_out over a whole
    cascade: evaluation calls it at the super-res model's default guidance and at 0, and 0 switches
    guidance off in both models (otherwise the base model keeps its own default)."""

    def generate(text, mask, seeds: list[int], guidance: float):
        off = 0.0 if guidance == 0 else None
        return cascade.generate_from_text(text, mask, seeds=seeds, guidance=off, superres_guidance=guidance)

    return generate


def checked_load(cfg: CascadeConfig, base_dir: Path, superres_dir: Path, tokenizer_dir: Path,
                 decoder_dir: Path | None, read_meta: Callable[[Path], dict], load_cascade: Callable):
    """A family's cascade with its frozen text encoder, as `cascade generate` and the registry use it.

    The encoder comes from params (features.encoder) and must be the one the base model was trained
    with: its fingerprint is compared with the one saved next to the weights (read_meta(base_dir)).
    load_cascade(cfg, base_dir, tokenizer_dir, superres_dir=, text_encoder=, decoder_dir=) builds it."""
    from models.text_encoder import FrozenTextEncoder

    for directory in (base_dir, tokenizer_dir, superres_dir) + ((decoder_dir,) if decoder_dir else ()):
        if not Path(directory).is_dir():
            raise BadInputError(f"{directory}: missing; train the cascade first (cascade repro)")
    enc = cfg.features.encoder
    try:
        saved = read_meta(base_dir).get("text_encoder", {})
        encoder = FrozenTextEncoder.from_spec(enc.kind, enc.path, enc.max_length)
        if saved.get("fingerprint") not in (None, encoder.fingerprint):
            raise BadInputError(f"{base_dir}: trained with text encoder {saved.get('kind')} "
                                f"({saved.get('path') or 'packaged'}), params has {enc.kind} ({enc.path or 'packaged'}); "
                                "features.encoder must match the training run")
        return load_cascade(cfg, base_dir, tokenizer_dir, superres_dir=superres_dir, text_encoder=encoder,
                            decoder_dir=decoder_dir)
    except ValueError as err:  # a missing/corrupt checkpoint or a broken contract, already one line
        raise BadInputError(str(err)) from None
