"""Stage `superres`: the Muse super-resolution model, then the whole cascade checked end to end.

Trains a masked transformer over the super-res tokenizer's tokens, conditioned on the text and on
the base tokenizer's token map of the same image (ground-truth low-res tokens in training, the
base model's samples at inference). After export, held-out test prompts run through the full
cascade (models.cascade: text -> base tokens -> super-res tokens -> super-res decoder) at the
default guidance of both models and with guidance off, and the exact checker reads the images.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from components.cascades import checked_generate
from components.compositional import check_held_out
from components.config import CascadeConfig
from components.errors import StageError
from components.generator import GeneratorResult, report_files, train
from components.io import ACCEPTED_FILE, write_json
from components.stage import TrackedInput, tracked
from components.tracking import lightning_logger


def load_cascade(cfg: CascadeConfig, base_dir: Path, tokenizer_dir: Path, superres_model=None,
                 superres_dir: Path | None = None, text_encoder=None, text_dim: int | None = None,
                 decoder_dir: Path | None = None):
    """models.cascade.Cascade from the stages' outputs; the contracts are checked on construction.

    decoder_dir: the decoder_ft stage's finetuned super-res tokenizer (default: the tokenizer stage's)."""
    from models.cascade import Cascade, CascadeSettings
    from models.masked_transformer import load_generator
    from models.sampling import SamplerSettings
    from models.tokenizer import load_tokenizer

    superres = superres_model if superres_model is not None else load_generator(Path(superres_dir))
    settings = CascadeSettings(SamplerSettings(**asdict(cfg.base.sample)), SamplerSettings(**asdict(cfg.superres.sample)))
    return Cascade(text_encoder, load_generator(Path(base_dir)), superres, load_tokenizer(Path(tokenizer_dir) / "base"),
                   load_tokenizer(Path(decoder_dir) if decoder_dir else Path(tokenizer_dir) / "superres"), settings,
                   text_dim=text_dim)


def load_for_inference(cfg: CascadeConfig, base_dir: Path, superres_dir: Path, tokenizer_dir: Path,
                       decoder_dir: Path | None = None):
    """The masked cascade with its frozen text encoder (components.cascades.checked_load)."""
    from components.cascades import checked_load
    from models.masked_transformer import read_generator_meta

    return checked_load(cfg, base_dir, superres_dir, tokenizer_dir, decoder_dir, read_generator_meta, load_cascade)


def run(cfg: CascadeConfig, tokens_dir: Path, features_dir: Path, tokenizer_dir: Path, validate_dir: Path,
        base_dir: Path, out_dir: Path, ckpt_dir: Path, logger=None, callbacks: list | None = None) -> GeneratorResult:
    out_dir = Path(out_dir)
    trained = train(cfg.superres, "superres", tokens_dir, features_dir, out_dir, ckpt_dir, logger, callbacks)
    if trained.model is None:  # a DDP rank other than 0
        return GeneratorResult({}, out_dir)
    metrics = dict(trained.metrics)
    cascade = load_cascade(cfg, base_dir, tokenizer_dir, superres_model=trained.model,
                           text_dim=trained.model.spec.text_dim)
    metrics.update(check_held_out(checked_generate(cascade), cfg.superres, features_dir, validate_dir, out_dir))
    write_json(out_dir / "metrics.json", metrics)
    return GeneratorResult(metrics, out_dir)


def execute(cfg: CascadeConfig, tokens_dir: Path, features_dir: Path, tokenizer_dir: Path, validate_dir: Path,
            base_dir: Path, out_dir: Path, ckpt_dir: Path, metrics_file: Path,
            parent_run_id: str | None = None, data_dir: Path | None = None) -> GeneratorResult:
    """The masked family's super-res model, or the diffusion family's pixel super-res (which reads
    the shard images in data_dir instead of super-res tokens)."""
    if cfg.generator.family == "diffusion":
        from components import diffusion

        if data_dir is None:
            raise StageError("superres: the diffusion family's pixel super-res model needs the data stage's shards")
        return tracked(
            "superres", cfg,
            lambda: diffusion.run_superres(cfg, data_dir, validate_dir, features_dir, tokenizer_dir, base_dir,
                                           out_dir, ckpt_dir, lightning_logger()),
            metrics_file,
            inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "superres")],
            artifacts=lambda r: [Path(out_dir) / name for name in diffusion.REPORT_FILES],
            parent_run_id=parent_run_id, section="diffusion.superres",
        )
    return tracked(
        "superres", cfg,
        lambda: run(cfg, tokens_dir, features_dir, tokenizer_dir, validate_dir, base_dir, out_dir, ckpt_dir,
                    lightning_logger()),
        metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "superres")],
        artifacts=lambda r: report_files(out_dir),
        parent_run_id=parent_run_id,
    )
