"""Stage `base`: the Muse base model, a masked transformer over the base tokenizer's tokens.

Trains from precomputed tokens + text features (components.generator), exports
out_dir/generator.safetensors + generator.json (spec and sampler settings), then checks the
base model alone: held-out test prompts are decoded by parallel decoding at the default guidance
and at guidance 0, turned into pixels by the base tokenizer, and read back by the exact checker.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from components.compositional import check_held_out
from components.config import CascadeConfig, GeneratorConfig
from components.generator import GeneratorResult, report_files, train
from components.errors import StageError
from components.io import ACCEPTED_FILE, write_json
from components.stage import TrackedInput, tracked
from components.tracking import lightning_logger


def run(cfg: GeneratorConfig, tokens_dir: Path, features_dir: Path, tokenizer_dir: Path, validate_dir: Path,
        out_dir: Path, ckpt_dir: Path, logger=None, callbacks: list | None = None) -> GeneratorResult:
    from models.masked_transformer import check_tokenizer_contract
    from models.sampling import SamplerSettings
    from models.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    trained = train(cfg, "base", tokens_dir, features_dir, out_dir, ckpt_dir, logger, callbacks)
    if trained.model is None:  # a DDP rank other than 0
        return GeneratorResult({}, out_dir)
    model, metrics = trained.model, dict(trained.metrics)
    decoder = load_tokenizer(Path(tokenizer_dir) / "base")
    check_tokenizer_contract(model.spec, decoder.codebook_size, decoder.spec.grid, what="base generator")
    generate = base_generate(model, decoder, SamplerSettings(**asdict(cfg.sample)))
    metrics.update(check_held_out(generate, cfg, features_dir, validate_dir, out_dir))
    write_json(out_dir / "metrics.json", metrics)
    return GeneratorResult(metrics, out_dir)


def base_generate(model, decoder, settings, seed_offset: int = 0):
    """The base model alone as `sample_and_check`'s generate(text, mask, seeds, guidance): tokens
    sampled with `settings` at seeds + seed_offset, decoded by the base tokenizer -> [B,3,R,R] in [-1,1]."""
    from models.sampling import decode

    @torch.no_grad()
    def generate(text: torch.Tensor, mask: torch.Tensor, seeds: list[int], guidance: float) -> torch.Tensor:
        tokens = decode(model, text, mask, settings.replace(guidance=guidance), [s + seed_offset for s in seeds])
        g = model.spec.grid  # tokens [B, g*g]
        return decoder.decode(tokens.view(-1, g, g)).clamp(-1, 1)

    return generate

def execute(cfg: CascadeConfig, tokens_dir: Path, features_dir: Path, tokenizer_dir: Path, validate_dir: Path,
            out_dir: Path, ckpt_dir: Path, metrics_file: Path, parent_run_id: str | None = None,
            phase: str | None = None, init_dir: Path | None = None) -> GeneratorResult:
    """The masked family's base model, or the diffusion family's: all PixArt phases (each in a nested
    MLflow run), or with `phase` just that one, started from `init_dir` (a KFP task per phase)."""
    inputs = lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "base")]  # noqa: E731
    if cfg.generator.family == "diffusion":
        from components import diffusion
        from components.tracking import phase_run

        return tracked(
            "base", cfg,
            lambda: diffusion.run_base(cfg, tokens_dir, features_dir, tokenizer_dir, validate_dir, out_dir, ckpt_dir,
                                       phases=(phase,) if phase else None, init_dir=init_dir,
                                       phase_run=None if phase else phase_run, logger_factory=lightning_logger),
            metrics_file, inputs=inputs,
            artifacts=lambda r: [Path(out_dir) / name for name in diffusion.REPORT_FILES],
            parent_run_id=parent_run_id, section="diffusion.base", run_name=f"base/{phase}" if phase else None,
        )
    if phase is not None:
        raise StageError("base: --phase is for the diffusion family's PixArt phases (generator.family: diffusion)")
    return tracked(
        "base", cfg,
        lambda: run(cfg.base, tokens_dir, features_dir, tokenizer_dir, validate_dir, out_dir, ckpt_dir,
                    lightning_logger()),
        metrics_file, inputs=inputs,
        artifacts=lambda r: report_files(out_dir),
        parent_run_id=parent_run_id,
    )
