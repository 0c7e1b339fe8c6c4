"""Stage `tokenizer`: train the base and super-resolution image tokenizers (Muse: two VQGANs).

Lightning runs the loop: bf16 mixed precision on GPU, DDP when `train.devices > 1`, a checkpoint
every `train.checkpoint_every` steps with `save_last`, and resume. Checkpoints live outside the
stage's DVC outputs (Layout.checkpoints), keyed by a fingerprint of the spec, the training config
and the data, so a killed run picks up where it stopped and a changed config starts afresh.

Loss (taming-transformers VQGAN): L1 + L2 reconstruction, optional perceptual, the codebook +
commitment (or KL) term, and after `disc_start` a hinge patch-GAN loss with adaptive weight.
One optimizer holds both the tokenizer and the discriminator as parameter groups, so Lightning's
global_step is the training step; the discriminator's group gets gradients only once the
adversarial loss is on (the generator term sees a frozen discriminator, the discriminator term
sees detached reconstructions).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from components.config import CascadeConfig, TokenizerConfig, TokenizerTrainConfig
from components.errors import BadInputError, StageError
from components.images import ShardImageDataset, augment, save_tiled, to_uint8
from components.io import ACCEPTED_FILE, frame_digest, write_json
from components.io import read_accepted as _read_accepted
from components.stage import TrackedInput, tracked
from components.tracking import lightning_logger
from components.training import code_digest, fingerprint, fit, warmup_cosine

WHICH = ("base", "superres")
IMAGE_COLUMNS = ["key", "shard", "image_member", "sha256", "split", "scene"]


def tokenizers_for(cfg: CascadeConfig) -> tuple[str, ...]:
    """The tokenizers a family uses: the diffusion family's super-res model works in pixels, so it
    needs only the base KL-VAE; the masked family needs both VQGANs."""
    return ("base",) if cfg.generator.family == "diffusion" else WHICH


def read_accepted(validate_dir: Path) -> pd.DataFrame:
    """The accepted rows with what reading and checking their images needs."""
    return _read_accepted(validate_dir, IMAGE_COLUMNS)


def spec_for(cfg: TokenizerConfig, which: str):
    from models.tokenizer import TokenizerSpec

    m = getattr(cfg, which)
    return TokenizerSpec(
        kind=cfg.kind, resolution=m.resolution, downsample=m.downsample, channels=tuple(m.channels),
        layers_per_block=m.layers_per_block, latent_channels=m.latent_channels,
        codebook_size=m.codebook_size if cfg.kind == "vqgan" else 0, norm_groups=m.norm_groups,
        commitment_beta=cfg.commitment_beta, codebook_dim=m.codebook_dim, quantizer=m.quantizer,
        mid_attention=m.mid_attention,
    )


def _split(accepted: pd.DataFrame, split: str, limit: int | None = None) -> pd.DataFrame:
    rows = accepted[accepted["split"] == split]
    return rows if limit is None else rows.head(limit)


# --- the Lightning module ---------------------------------------------------------------------

def _lightning_module():
    """Built lazily: importing Lightning costs seconds that `cascade --help` should not pay."""
    import lightning as L

    from models.discriminator import PatchDiscriminator
    from models.losses import PerceptualLoss, adaptive_gan_weight, generator_adv_loss, hinge_d_loss
    from models.tokenizer import ImageTokenizer, TokenizerSpec

    class TokenizerModule(L.LightningModule):
        def __init__(self, spec: dict, train: dict, perceptual_weights: str | None, perceptual_weight: float):
            super().__init__()
            self.save_hyperparameters(logger=False)  # in the checkpoint; the stage logs the config itself
            self.train_cfg = TokenizerTrainConfig(**train)
            self.tokenizer = ImageTokenizer(TokenizerSpec.from_dict(spec))
            self.discriminator = PatchDiscriminator(n_layers=_disc_layers(self.tokenizer.spec.resolution))
            self.perceptual = PerceptualLoss.from_safetensors(perceptual_weights) if perceptual_weights else None
            k = max(self.tokenizer.codebook_size, 1)
            self.register_buffer("code_usage", torch.zeros(k))  # uses since the last restart; checkpointed

        def configure_optimizers(self):
            t = self.train_cfg
            optimizer = torch.optim.Adam([
                {"params": self.tokenizer.parameters(), "lr": t.lr},
                {"params": self.discriminator.parameters(), "lr": t.disc_lr},
            ], betas=tuple(t.betas))
            return {"optimizer": optimizer, "lr_scheduler": warmup_cosine(optimizer, t.warmup_steps, t.steps)}

        def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
            t = self.train_cfg
            images = augment(images, t.augment) if t.augment else images
            out = self.tokenizer(images)  # recon [B,3,R,R]
            rec = t.l1_weight * (out.recon - images).abs().mean() + t.l2_weight * (out.recon - images).pow(2).mean()
            if self.perceptual is not None and self.hparams.perceptual_weight > 0:
                rec = rec + self.hparams.perceptual_weight * self.perceptual(out.recon, images)
            loss = rec + (t.reg_weight if self.tokenizer.is_vq else t.kl_weight) * out.reg_loss
            gan_on = self.global_step >= t.disc_start
            if gan_on:
                self.discriminator.requires_grad_(False)  # the generator term must not train D
                g_loss = generator_adv_loss(self.discriminator(out.recon))
                self.discriminator.requires_grad_(True)
                weight = adaptive_gan_weight(rec, g_loss, self.tokenizer.last_decoder_weight()) * t.disc_weight
                d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(out.recon.detach()))
                loss = loss + weight * g_loss + d_loss
                self.log_dict({"train/g_loss": g_loss.detach(), "train/d_loss": d_loss.detach(),
                               "train/gan_weight": weight.detach()}, on_step=True)
            if not torch.isfinite(loss):
                raise StageError(f"tokenizer: loss became {loss.item()} at step {self.global_step}; "
                                 f"the last good checkpoint is kept in {self.trainer.default_root_dir}")
            if out.indices is not None:
                self.code_usage += torch.bincount(out.indices.flatten(), minlength=self.code_usage.numel()).float()
                self._last_latents = out.latents.detach()
            self.log_dict({"train/loss": loss.detach(), "train/rec": rec.detach(), "train/reg": out.reg_loss.detach()},
                          on_step=True, prog_bar=True)
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
            every = self.train_cfg.restart_every
            settling = self.global_step >= 0.9 * self.train_cfg.steps  # let the final codebook settle
            if not self.tokenizer.is_vq or every <= 0 or self.global_step % every != 0 or settling:
                return
            usage = self.code_usage
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(usage)
            latents = self._last_latents.permute(0, 2, 3, 1).reshape(-1, self._last_latents.shape[1])  # [N, C]
            restarted = self.tokenizer.restart_dead_codes(latents, usage)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                for p in self.tokenizer.parameters():  # ranks restarted from their own latents: adopt rank 0's
                    torch.distributed.broadcast(p.data, 0)
            self.log("train/codes_restarted", float(restarted), on_step=True)
            self.code_usage.zero_()

    return TokenizerModule


def _disc_layers(resolution: int) -> int:
    """taming's 3-layer patch discriminator, fewer when the images are too small for it (3 * 2**n <= side)."""
    return max(1, min(3, int(math.log2(resolution / 3))))


# --- training ---------------------------------------------------------------------------------

def train_one(cfg: TokenizerConfig, which: str, data_dir: Path, accepted: pd.DataFrame, out_dir: Path,
              ckpt_dir: Path, logger=None) -> dict:
    """Train one tokenizer, export it as safetensors + JSON into out_dir/<which>; returns its metrics."""
    import lightning as L

    from models.tokenizer import save_tokenizer

    t = cfg.train_for(which)
    spec = spec_for(cfg, which)
    train_rows = _split(accepted, "train")
    if len(train_rows) == 0:
        raise BadInputError("tokenizer: no accepted items in the train split")
    dataset = ShardImageDataset(data_dir, train_rows, spec.resolution)
    perceptual = (cfg.perceptual.weights, cfg.perceptual.weight)
    import components.images
    import models.discriminator
    import models.losses
    import models.tokenizer

    # components.images: the dataset and the augmentation feed training
    code = code_digest(models.tokenizer, models.discriminator, models.losses, components.images, sys.modules[__name__])
    run_fingerprint = fingerprint(spec=spec.to_dict(), train=asdict(t), perceptual=perceptual,
                                  data=frame_digest(train_rows[["key", "sha256"]]), code=code)

    L.seed_everything(t.seed, workers=True, verbose=False)  # same init on every rank
    module = _lightning_module()(spec.to_dict(), asdict(t), *perceptual)
    result = fit(f"tokenizer {which}", module, dataset, t, ckpt_dir=ckpt_dir, run_fingerprint=run_fingerprint,
                 logger=logger, find_unused_parameters=True)  # D is idle before disc_start
    trainer, seconds, resumed_from = result.trainer, result.seconds, result.resumed_from
    if trainer.global_rank != 0:
        return {}
    model = module.tokenizer.eval().float().cpu()
    save_tokenizer(model, out_dir / which)
    metrics = evaluate(model, data_dir, accepted, cfg.eval_images, out_dir / which)
    metrics.update({"train_seconds": seconds, "resumed_from_step": resumed_from,
                    "images_per_second": (t.steps - resumed_from) * t.batch_size / max(seconds, 1e-9)})
    write_json(out_dir / which / "metrics.json", metrics)
    return metrics


# --- evaluation -------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(model, data_dir: Path, accepted: pd.DataFrame, n_images: int, out_dir: Path) -> dict:
    """Validation PSNR / L1 / codebook usage / perplexity, a reconstruction grid, and (for the
    built-in dataset) the exact checker on reconstructions of the test split."""
    from models.losses import psnr
    from models.tokenizer import codebook_stats

    res = model.spec.resolution
    val = ShardImageDataset(data_dir, _split(accepted, "val", n_images), res)
    if len(val) == 0:
        raise BadInputError("tokenizer: no accepted items in the val split to evaluate on")
    originals, recons, codes = [], [], []
    for batch in torch.utils.data.DataLoader(val, batch_size=64):
        out = model(batch)
        originals.append(batch)
        recons.append(out.recon.clamp(-1, 1))
        if out.indices is not None:
            codes.append(out.indices)
    x, y = torch.cat(originals), torch.cat(recons)
    metrics = {"psnr": float(psnr(y, x)), "l1": float((y - x).abs().mean())}
    if codes:
        usage, perplexity = codebook_stats(torch.cat(codes), model.codebook_size)
        metrics.update({"codebook_usage": usage, "perplexity": perplexity})
    save_grid(x[:32], y[:32], out_dir / "recon_grid.png")
    metrics.update(_checker_accuracy(model, data_dir, _split(accepted, "test", n_images)))
    return metrics


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Pairs (original | reconstruction) tiled into one PNG."""
    pairs = np.concatenate([to_uint8(originals), to_uint8(recons)], axis=2)  # [N, H, 2W, 3]
    return save_tiled(pairs, path, columns)


def _checker_accuracy(model, data_dir: Path, test: pd.DataFrame) -> dict:
    from models.checker import score
    from models.shapes import Scene

    test = test[test["scene"].notna()]
    if len(test) == 0:
        return {}  # user data: no structured scenes to check against
    dataset = ShardImageDataset(data_dir, test, model.spec.resolution)
    images = []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=64):
        images.extend(to_uint8(model(batch).recon))
    targets = [Scene.from_dict(json.loads(s)) for s in test["scene"]]
    scores = score(images, targets)
    return {f"checker_{k}": float(v) for k, v in scores.items() if k in ("colour", "shape", "count", "position", "overall")
            and not math.isnan(float(v))}


# --- the stage --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenizerResult:
    per_tokenizer: dict[str, dict]
    out_dir: Path

    @property
    def metrics(self) -> dict[str, float]:
        return {f"{which}.{k}": float(v) for which, m in self.per_tokenizer.items() for k, v in m.items()}


def run(cfg: TokenizerConfig, data_dir: Path, validate_dir: Path, out_dir: Path, ckpt_root: Path,
        logger_factory: Callable[[str], object] | None = None, which_ones: tuple[str, ...] = WHICH) -> TokenizerResult:
    out_dir = Path(out_dir)
    accepted = read_accepted(validate_dir)
    results = {}
    for which in which_ones:
        logger = logger_factory(which) if logger_factory else None
        results[which] = train_one(cfg, which, Path(data_dir), accepted, out_dir, Path(ckpt_root) / which, logger)
    return TokenizerResult(results, out_dir)


def execute(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, out_dir: Path, ckpt_root: Path,
            metrics_file: Path, parent_run_id: str | None = None) -> TokenizerResult:
    return tracked(
        "tokenizer", cfg,
        lambda: run(cfg.tokenizer, data_dir, validate_dir, out_dir, ckpt_root, lightning_logger, tokenizers_for(cfg)),
        metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "tokenizer")],
        artifacts=lambda r: [p for which in tokenizers_for(cfg) for p in (Path(out_dir) / which / "recon_grid.png",
                                                             Path(out_dir) / which / "tokenizer.json")],
        parent_run_id=parent_run_id,
    )
