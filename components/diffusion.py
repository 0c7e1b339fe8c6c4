"""The diffusion family's `base` and `superres` stages (generator.family: diffusion).

base: latent diffusion on the base KL-VAE's precomputed latents (XGen-Image-1), with PixArt-alpha's
decomposed training: the phases in `diffusion.base.phases` run in order, each initialised from the
previous phase's exported weights and trained on its own data:

    pixel     text: false   every training item, null text: the pixel dependencies (unconditional)
    align     text: true    text-image alignment on the captions (10% null text for guidance)
    finetune  text: true    a lower-lr finetune on the densest captions (min_caption_words)

    out_dir/phases/<name>/diffusion.{safetensors,json}   each phase's weights (the next one's init)
    out_dir/diffusion.{safetensors,json}                 the last phase: what the cascade uses

Under DVC the phases run in one process, each in its own MLflow run nested under the stage's run;
the KFP pipeline runs one task per phase (base-<name>) and passes the weights along.

superres: Imagen's text-conditioned pixel super-resolution U-Net, trained on the shard images at
the super-res resolution with their downscaled copies as the low-res input, noised at a random
augmentation level (noise conditioning augmentation); then the whole cascade is checked.

Random streams as in the masked family: identical initialisation on every rank, per-(seed, rank,
step) generators for timesteps, noise, augmentation levels and text dropout.
"""

from __future__ import annotations

import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.cascades import checked_generate
from components.compositional import check_held_out
from components.config import CascadeConfig, DiffusionSamplerConfig, GeneratorTrainConfig, PhaseConfig
from components.errors import BadInputError, StageError
from components.features import FeatureStore
from components.generator import (BatchDataset, GeneratorResult, fit_generator, hash_seed,
                                  open_stores)
from components.images import ShardImageDataset
from components.io import frame_digest, read_accepted, write_json
from components.tokens import TokenStore
from components.training import adamw_warmup_cosine, code_digest, fingerprint

PHASES_DIR = "phases"
REPORT_FILES = ("diffusion.json", "samples.png", "samples.txt", "checker.md")


def sampler_settings(cfg: DiffusionSamplerConfig):
    from models.diffusion_sampling import DiffusionSampler

    return DiffusionSampler(**asdict(cfg))


# --- data -------------------------------------------------------------------------------------

class LatentTextDataset(BatchDataset):
    """Precomputed base latents (normalised to the model space) + text features by item key."""

    def __init__(self, tokens: TokenStore, features: FeatureStore, keys: list[str], shift: float, scale: float):
        self.tokens, self.features, self.keys = tokens, features, list(keys)
        self.shift, self.scale = shift, scale

    def __getitems__(self, indices: list[int]) -> dict:
        keys = [self.keys[i] for i in indices]
        text, text_mask = self.features.lookup(keys)  # [B,L,D], [B,L]
        latents = self.tokens.lookup("base", keys)  # [B,C,g,g]
        return {"x0": (latents - self.shift) * self.scale, "text": text, "text_mask": text_mask}


class PixelTextDataset(BatchDataset):
    """Shard images at the super-res side [B,3,R,R], their low-res copies [B,3,r,r] (area
    downscaling, Imagen) and the text features."""

    def __init__(self, images: ShardImageDataset, features: FeatureStore, low_res: int):
        self.images, self.features, self.low_res, self.keys = images, features, low_res, images.keys

    def __getitems__(self, indices: list[int]) -> dict:
        high = torch.stack([self.images[i] for i in indices])  # [B,3,R,R]
        text, text_mask = self.features.lookup([self.keys[i] for i in indices])
        low = F.interpolate(high, size=(self.low_res, self.low_res), mode="area")  # [B,3,r,r]
        return {"x0": high, "low_res": low, "text": text, "text_mask": text_mask}


def latent_statistics(tokens: TokenStore, keys: list[str]) -> tuple[float, float]:
    """(shift, scale) that give the training latents zero mean and unit variance (as SD's scaling factor)."""
    latents = tokens.lookup("base", keys).double()
    std = float(latents.std())
    if not np.isfinite(std) or std <= 0:
        raise BadInputError("base latents have zero or non-finite variance; retrain the KL tokenizer")
    return float(latents.mean()), 1.0 / std


def phase_keys(validate_dir: Path, keys: list[str], phase: PhaseConfig) -> list[str]:
    """A phase's own data: the training items whose caption has at least min_caption_words words."""
    if phase.min_caption_words <= 0:
        return list(keys)
    captions = read_accepted(validate_dir, ["key", "caption"]).set_index("key")["caption"]
    chosen = [k for k in keys if len(str(captions[k]).split()) >= phase.min_caption_words]
    if not chosen:
        raise BadInputError(f"diffusion.base.phases {phase.name}: no training caption has "
                            f"{phase.min_caption_words} or more words; lower min_caption_words")
    return chosen


# --- the Lightning module ---------------------------------------------------------------------

def _lightning_module():
    """Built lazily: importing Lightning costs seconds that `cascade --help` should not pay."""
    import lightning as L

    from models.diffusion import DiffusionModel, DiffusionSpec, diffusion_loss, drop_text, training_schedule

    class DiffusionModule(L.LightningModule):
        def __init__(self, spec: dict, train: dict, stage: str, text: bool = True, aug_max: float = 0.0):
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.train_cfg = GeneratorTrainConfig(**train)
            self.stage, self.text, self.aug_max = stage, text, aug_max
            self.model = DiffusionModel(DiffusionSpec.from_dict(spec))
            self.schedule = training_schedule(self.model.spec)
            self.last_aug_steps: torch.Tensor | None = None  # the last step's draws, for inspection (tests)
            self.last_dropped: torch.Tensor | None = None

        def configure_optimizers(self):
            return adamw_warmup_cosine(self.model, self.train_cfg)

        def on_train_start(self) -> None:
            # dropout draws from the global RNG: per rank, and moved on by the resumed step
            torch.manual_seed(self.train_cfg.seed + 1000 * self.global_rank + 7919 * self.global_step)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            t = self.train_cfg
            g = torch.Generator().manual_seed(hash_seed(t.seed, self.global_rank, self.global_step))
            x0 = batch["x0"]
            B = x0.shape[0]
            # an unconditional phase trains on the null text only (PixArt phase 1: pixel dependencies)
            dropped = torch.ones(B, dtype=torch.bool) if not self.text else torch.rand(B, generator=g) < t.text_dropout
            text, text_mask = drop_text(batch["text"], batch["text_mask"], dropped.to(x0.device))
            parts = diffusion_loss(self.model, self.schedule, x0, text, text_mask, g, batch.get("low_res"), self.aug_max)
            if not torch.isfinite(parts.loss):
                raise StageError(f"{self.stage}: loss became {parts.loss.item()} at step {self.global_step}; "
                                 f"training stopped, the last good checkpoint is kept in {self.trainer.default_root_dir}")
            self.last_aug_steps, self.last_dropped = parts.aug_steps, dropped
            self.log("train/loss", parts.loss.detach(), on_step=True, prog_bar=True)
            return parts.loss

    return DiffusionModule


def _train(stage: str, spec, loop: GeneratorTrainConfig, dataset, ckpt_dir: Path, run_fingerprint: str,
           logger=None, callbacks: list | None = None, text: bool = True, aug_max: float = 0.0, init=None):
    """Fit one denoiser; returns (model or None on ranks > 0, metrics)."""
    import lightning as L

    if loop.batch_size > len(dataset):
        raise BadInputError(f"{stage}: batch_size {loop.batch_size} exceeds the {len(dataset)} training items")
    L.seed_everything(loop.seed, workers=True, verbose=False)  # identical initialisation on every rank
    module = _lightning_module()(spec.to_dict(), asdict(loop), stage, text, aug_max)
    if init is not None:
        module.model.load_state_dict(init.state_dict())
    result = fit_generator(stage, module, dataset, loop, ckpt_dir, run_fingerprint, logger, callbacks)
    if result.trainer.global_rank != 0:
        return None, {}
    model = module.model.eval().float().cpu()
    metrics = {"train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
               "images_per_second": (loop.steps - result.resumed_from) * loop.batch_size / max(result.seconds, 1e-9),
               "parameters": sum(p.numel() for p in model.parameters())}
    loss = result.trainer.callback_metrics.get("train/loss")
    if loss is not None:
        metrics["final_loss"] = float(loss)
    return model, metrics


def _code() -> str:
    import models.diffusion

    return code_digest(models.diffusion, sys.modules[__name__])


# --- stage base -------------------------------------------------------------------------------

def base_spec(cfg: CascadeConfig, tokens: TokenStore, features: FeatureStore, shift: float, scale: float):
    """The latent model's spec: sizes from params, latent shape from the tokens, text from the features."""
    meta = tokens.meta.get("base")
    if meta is None or meta["kind"] != "kl":
        raise BadInputError("base: the diffusion family needs KL latents from the tokens stage "
                            f"(found {meta['kind'] if meta else 'none'}); set tokenizer.kind: kl and re-run tokenizer, tokens")
    return latent_spec(cfg, int(meta["shape"][1]), meta["grid"], features.dim, features.max_length, shift, scale)


def latent_spec(cfg: CascadeConfig, channels: int, grid: int, text_dim: int, text_length: int,
                shift: float = 0.0, scale: float = 1.0):
    from models.diffusion import DiffusionSpec

    d = cfg.diffusion.base
    return DiffusionSpec(
        backbone=d.backbone, channels_in=channels, size=grid, text_dim=text_dim, text_length=text_length,
        width=d.dit.width, depth=d.dit.depth, heads=d.dit.heads, patch_size=d.dit.patch_size,
        unet_channels=tuple(d.unet.channels), layers_per_block=d.unet.layers_per_block,
        attention_head_dim=d.unet.attention_head_dim, norm_groups=d.unet.norm_groups,
        attention_levels=d.unet.attention_levels, train_timesteps=d.schedule.train_timesteps,
        beta_schedule=d.schedule.beta_schedule, prediction=d.schedule.prediction, latent_shift=shift,
        latent_scale=scale)


def phase_loop(cfg: CascadeConfig, phase: PhaseConfig) -> GeneratorTrainConfig:
    t = cfg.diffusion.base.train
    return GeneratorTrainConfig(steps=phase.steps, lr=phase.lr, warmup_steps=phase.warmup_steps, **asdict(t))


def select_phases(cfg: CascadeConfig, names: tuple[str, ...] | None) -> list[PhaseConfig]:
    phases = list(cfg.diffusion.base.phases)
    if names is None:
        return phases
    known = [p.name for p in phases]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInputError(f"base: unknown phase {unknown[0]!r} (diffusion.base.phases: {', '.join(known)})")
    return [p for p in phases if p.name in names]


def run_base(cfg: CascadeConfig, tokens_dir: Path, features_dir: Path, tokenizer_dir: Path, validate_dir: Path,
             out_dir: Path, ckpt_dir: Path, phases: tuple[str, ...] | None = None, init_dir: Path | None = None,
             phase_run=None, logger_factory=None, callbacks: list | None = None) -> GeneratorResult:
    """Train the PixArt phases (all, or `phases`), each from the previous one's weights; export the
    last; after the final phase, check base samples (VAE-decoded) with the exact checker.

    init_dir: the weights the first selected phase starts from (a previous phase's export; KFP).
    phase_run(name, params): a context manager that records one phase (a nested MLflow run)."""
    from models.diffusion import diffusion_digest, load_diffusion, save_diffusion

    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    tokens, features = open_stores(tokens_dir, features_dir)
    keys = tokens.keys[tokens.keys["split"] == "train"]["key"].tolist()
    if not keys:
        raise BadInputError("base: no accepted items in the train split")
    shift, scale = latent_statistics(tokens, keys)
    spec = base_spec(cfg, tokens, features, shift, scale)
    selected = select_phases(cfg, phases)
    names = [p.name for p in cfg.diffusion.base.phases]
    init = None
    if init_dir is not None:
        init = _load_init(Path(init_dir), spec)
    elif selected[0].name != names[0]:
        raise BadInputError(f"base: phase {selected[0].name!r} starts from phase {names[names.index(selected[0].name) - 1]!r}'s "
                            "weights; pass them (init_dir) or run the phases in order")
    metrics: dict[str, float] = {}
    model = None
    for phase in selected:
        loop = phase_loop(cfg, phase)
        dataset = LatentTextDataset(tokens, features, phase_keys(validate_dir, keys, phase), shift, scale)
        run_fingerprint = fingerprint(spec=spec.to_dict(), train=asdict(loop), phase=asdict(phase),
                                      tokens=tokens.address("base"), features=features.fingerprint, code=_code(),
                                      init=diffusion_digest(init.directory) if init is not None else None)
        params = {f"phase.{k}": v for k, v in asdict(phase).items()} | {"phase.items": len(dataset)}
        with (phase_run(phase.name, params) if phase_run else nullcontext()):
            logger = logger_factory() if logger_factory else None
            model, phase_metrics = _train(f"base/{phase.name}", spec, loop, dataset, ckpt_dir / phase.name,
                                          run_fingerprint, logger, callbacks, text=phase.text,
                                          init=init.model if init is not None else None)
            if model is None:  # a DDP rank other than 0
                return GeneratorResult({}, out_dir)
            phase_metrics["items"] = len(dataset)
            if phase_run:
                _log_phase_metrics(phase_metrics)
        phase_dir = out_dir / PHASES_DIR / phase.name
        save_diffusion(model, phase_dir, extra={"phase": phase.name, "sample": asdict(cfg.diffusion.base.sample),
                                                "tokens": tokens.address("base"), "text_encoder": features.encoder})
        metrics.update({f"{phase.name}.{k}": v for k, v in phase_metrics.items()})
        init = _Init(load_diffusion(phase_dir, expect=spec), phase_dir)
    final = out_dir / PHASES_DIR / selected[-1].name
    for name in (f.name for f in final.iterdir() if f.is_file()):
        shutil.copy2(final / name, out_dir / name)
    metrics["train_seconds"] = sum(v for k, v in metrics.items() if k.endswith(".train_seconds"))
    if selected[-1].name == names[-1]:  # the finished base model: check what it draws
        metrics.update(_check_base(cfg, model, tokenizer_dir, features_dir, validate_dir, out_dir))
    write_json(out_dir / "metrics.json", metrics)
    return GeneratorResult(metrics, out_dir)


@dataclass(frozen=True)
class _Init:
    model: object  # models.diffusion.DiffusionModel
    directory: Path


def _load_init(directory: Path, spec) -> _Init:
    from models.diffusion import load_diffusion

    try:
        return _Init(load_diffusion(directory, expect=spec), directory)
    except ValueError as err:  # missing, corrupt, or another architecture: one line naming the file
        raise BadInputError(f"base: cannot start from the previous phase: {err}") from None


def _log_phase_metrics(metrics: dict[str, float]) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def _check_base(cfg: CascadeConfig, model, tokenizer_dir: Path, features_dir: Path, validate_dir: Path,
                out_dir: Path) -> dict:
    from models.diffusion import check_latent_contract, to_latents
    from models.diffusion_sampling import sample
    from models.tokenizer import load_tokenizer

    vae = load_tokenizer(Path(tokenizer_dir) / "base")
    check_latent_contract(model.spec, vae.spec.latent_channels, vae.spec.grid)
    settings = sampler_settings(cfg.diffusion.base.sample)

    def generate(text: torch.Tensor, mask: torch.Tensor, seeds: list[int], guidance: float) -> torch.Tensor:
        z = sample(model, text, mask, settings.replace(guidance=guidance), seeds)  # [B,C,g,g]
        return vae.decode(to_latents(model.spec, z)).clamp(-1, 1)

    return check_held_out(generate, cfg.diffusion.base, features_dir, validate_dir, out_dir)


# --- stage superres ---------------------------------------------------------------------------

def superres_spec(cfg: CascadeConfig, text_dim: int, text_length: int):
    from models.diffusion import DiffusionSpec

    d = cfg.diffusion.superres
    return DiffusionSpec(
        backbone="unet", channels_in=3, size=cfg.tokenizer.superres.resolution, text_dim=text_dim,
        text_length=text_length, unet_channels=tuple(d.unet.channels), layers_per_block=d.unet.layers_per_block,
        attention_head_dim=d.unet.attention_head_dim, norm_groups=d.unet.norm_groups,
        attention_levels=d.unet.attention_levels, train_timesteps=d.schedule.train_timesteps,
        beta_schedule=d.schedule.beta_schedule, prediction=d.schedule.prediction,
        low_res=cfg.tokenizer.base.resolution)


def run_superres(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, features_dir: Path, tokenizer_dir: Path,
                 base_dir: Path, out_dir: Path, ckpt_dir: Path, logger=None,
                 callbacks: list | None = None) -> GeneratorResult:
    from components.tokenizer import _split, read_accepted as read_image_rows
    from models.diffusion import save_diffusion

    out_dir = Path(out_dir)
    d = cfg.diffusion.superres
    features = FeatureStore.open(features_dir)
    rows = _split(read_image_rows(validate_dir), "train")
    if rows.empty:
        raise BadInputError("superres: no accepted items in the train split")
    spec = superres_spec(cfg, features.dim, features.max_length)
    dataset = PixelTextDataset(ShardImageDataset(data_dir, rows, spec.size), features, spec.low_res)
    run_fingerprint = fingerprint(spec=spec.to_dict(), train=asdict(d.train), aug=asdict(d.noise_aug),
                                  data=frame_digest(rows[["key", "sha256"]]), features=features.fingerprint, code=_code())
    model, metrics = _train("superres", spec, d.train, dataset, Path(ckpt_dir), run_fingerprint, logger, callbacks,
                            aug_max=d.noise_aug.train_max)
    if model is None:
        return GeneratorResult({}, out_dir)
    save_diffusion(model, out_dir, extra={"sample": asdict(d.sample), "noise_aug": asdict(d.noise_aug),
                                          "text_encoder": features.encoder})
    cascade = load_cascade(cfg, base_dir, tokenizer_dir, superres_model=model, text_dim=spec.text_dim)
    metrics.update(check_held_out(checked_generate(cascade), d, features_dir, validate_dir, out_dir))
    write_json(out_dir / "metrics.json", metrics)
    return GeneratorResult(metrics, out_dir)


# --- the cascade ------------------------------------------------------------------------------

def load_cascade(cfg: CascadeConfig, base_dir: Path, tokenizer_dir: Path, superres_model=None,
                 superres_dir: Path | None = None, text_encoder=None, text_dim: int | None = None,
                 decoder_dir: Path | None = None):
    """models.diffusion_cascade.DiffusionCascade from the stages' outputs (contracts checked).

    decoder_dir: decoder_ft's finetuned KL-VAE (default: the tokenizer stage's base VAE)."""
    from models.diffusion import load_diffusion
    from models.diffusion_cascade import DiffusionCascade, DiffusionCascadeSettings
    from models.tokenizer import load_tokenizer

    d = cfg.diffusion
    superres = superres_model if superres_model is not None else load_diffusion(Path(superres_dir))
    settings = DiffusionCascadeSettings(sampler_settings(d.base.sample), sampler_settings(d.superres.sample),
                                        d.superres.noise_aug.sample)
    vae = load_tokenizer(Path(decoder_dir) if decoder_dir else Path(tokenizer_dir) / "base")
    return DiffusionCascade(text_encoder, load_diffusion(Path(base_dir)), superres, vae, settings, text_dim=text_dim)


def load_for_inference(cfg: CascadeConfig, base_dir: Path, superres_dir: Path, tokenizer_dir: Path,
                       decoder_dir: Path | None = None):
    """The diffusion cascade with its frozen text encoder (components.cascades.checked_load)."""
    from components.cascades import checked_load
    from models.diffusion import read_diffusion_meta

    return checked_load(cfg, base_dir, superres_dir, tokenizer_dir, decoder_dir, read_diffusion_meta, load_cascade)
