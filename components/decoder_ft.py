"""Stage `decoder_ft`: Muse decoder finetuning for the super-resolution tokenizer.

A larger decoder (more channels and residual layers, from params) is trained to reconstruct the
training images from the super-res tokenizer's precomputed codes, while everything that defines the
codes stays frozen: the encoder, quant_conv and codebook (their grads are off and they are not in
the optimizer) and the base and super-res generators. Their tensors and files are digested before
and after training; any change fails the stage.

    codes [B,g,g] (tokens stage) --codebook--> post_quant_conv + new decoder --> images [B,3,R,R]
    loss = l1_weight * L1 + l2_weight * MSE against the shard images in [-1,1]

out_dir is a normal tokenizer directory (tokenizer.safetensors + tokenizer.json, same codebook and
grid, so the super-res generator's tokens decode unchanged) plus metrics.json, comparison.png (rows:
original | old decoder | new decoder) and report.md: validation PSNR / L1 / reconstruction FID of
the old and new decoder on the same codes.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.config import CascadeConfig, DecoderTrainConfig
from components.errors import BadInputError, StageError
from components.images import ShardImageDataset, save_tiled, to_uint8
from components.io import ACCEPTED_FILE, frame_digest, write_json
from components.stage import TrackedInput, tracked
from components.tokenizer import _split, read_accepted
from components.tokens import KEYS_FILE, TokenStore
from components.tracking import lightning_logger
from components.training import code_digest, fingerprint, fit, warmup_cosine

REPORT_FILES = ("comparison.png", "report.md", "tokenizer.json")
FROZEN_TENSORS = "encoder, quant_conv and codebook"


@dataclass(frozen=True)
class DecoderFinetuneResult:
    metrics: dict[str, float]
    out_dir: Path


class CodeImageDataset(torch.utils.data.Dataset):
    """Item i: (super-res token map [g,g] long, its image [3,R,R] in [-1,1])."""

    def __init__(self, tokens: TokenStore, images: ShardImageDataset):
        self.tokens, self.images = tokens, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.lookup("superres", [self.images.keys[index]])[0], self.images[index]


def _lightning_module():
    """Built lazily: importing Lightning costs seconds that `cascade --help` should not pay."""
    import lightning as L

    from models.tokenizer import frozen_parameter_names

    class DecoderModule(L.LightningModule):
        def __init__(self, tokenizer, train: dict):
            super().__init__()
            self.train_cfg = DecoderTrainConfig(**train)
            self.tokenizer = tokenizer
            frozen = set(frozen_parameter_names(tokenizer))
            for name, p in tokenizer.named_parameters():
                p.requires_grad_(name not in frozen)

        def configure_optimizers(self):
            t = self.train_cfg
            trainable = [p for p in self.tokenizer.parameters() if p.requires_grad]  # decoder + post_quant_conv
            optimizer = torch.optim.Adam(trainable, lr=t.lr, betas=tuple(t.betas))
            return {"optimizer": optimizer, "lr_scheduler": warmup_cosine(optimizer, t.warmup_steps, t.steps)}

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            t = self.train_cfg
            codes, images = batch  # [B,g,g], [B,3,R,R]
            recon = self.tokenizer.decode(codes)  # [B,3,R,R]
            loss = t.l1_weight * (recon - images).abs().mean() + t.l2_weight * (recon - images).pow(2).mean()
            if not torch.isfinite(loss):
                raise StageError(f"decoder_ft: loss became {loss.item()} at step {self.global_step}; "
                                 f"the last good checkpoint is kept in {self.trainer.default_root_dir}")
            self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
            return loss

    return DecoderModule


# --- frozen parts ---------------------------------------------------------------------------------

def frozen_digest(tokenizer) -> str:
    """sha256 over the encoder, quant_conv and codebook tensors (names and bytes)."""
    from models.tokenizer import frozen_parameter_names

    h = hashlib.sha256()
    params = dict(tokenizer.named_parameters())
    for name in frozen_parameter_names(tokenizer):
        h.update(name.encode() + b"\0")
        h.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def frozen_files(tokenizer_dir: Path, base_dir: Path, superres_dir: Path) -> dict[str, str]:
    """Digests of the saved models decoder finetuning must not touch, by what to name in an error."""
    from models.masked_transformer import generator_digest
    from models.tokenizer import tokenizer_digest

    try:
        return {f"super-res tokenizer {tokenizer_dir}": tokenizer_digest(tokenizer_dir),
                f"base generator {base_dir}": generator_digest(base_dir),
                f"super-res generator {superres_dir}": generator_digest(superres_dir)}
    except ValueError as err:  # a missing file, named
        raise BadInputError(f"decoder_ft: {err}") from None


def check_unchanged(before: dict[str, str], after: dict[str, str], ckpt_dir: Path) -> None:
    changed = [what for what in before if before[what] != after.get(what)]
    if changed:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a run that moved frozen parts must not be resumed
        raise StageError(f"decoder_ft: frozen {', '.join(changed)} changed during decoder finetuning; only the "
                         f"decoder may train (its checkpoints in {ckpt_dir} were discarded; re-run the upstream "
                         "stages if their files changed)")


# --- inputs -----------------------------------------------------------------------------------------

def load_source(cfg: CascadeConfig, directory: Path):
    """The trained super-res tokenizer (vqgan only) and its digest; params checked against it."""
    from models.tokenizer import load_tokenizer, tokenizer_digest

    try:
        source, digest = load_tokenizer(directory), tokenizer_digest(directory)
    except ValueError as err:
        raise BadInputError(str(err)) from None
    if not source.is_vq:
        raise BadInputError(f"{directory}: a kl tokenizer; decoder finetuning (Muse) trains a decoder for the "
                            "VQGAN's discrete codes (set tokenizer.kind: vqgan)")
    widths = source.spec.decoder_widths
    if len(cfg.decoder_ft.channels) != len(widths):
        raise BadInputError(f"params.yaml: decoder_ft.channels {list(cfg.decoder_ft.channels)} needs {len(widths)} "
                            f"entries, one per block of the super-res tokenizer's decoder {list(widths)}")
    return source, digest


def open_tokens(tokens_dir: Path, tokenizer_digest: str, superres_dir: Path) -> TokenStore:
    """The precomputed super-res codes, checked to come from this tokenizer and to be what the
    super-res generator was trained on."""
    from models.masked_transformer import read_generator_meta

    tokens_dir = Path(tokens_dir)
    if not (tokens_dir / KEYS_FILE).is_file():
        raise BadInputError(f"{tokens_dir / KEYS_FILE}: missing; run the tokens stage first (cascade stage tokens)")
    try:
        store = TokenStore(tokens_dir)
    except (OSError, ValueError, KeyError) as err:
        raise BadInputError(f"{tokens_dir}: unreadable precomputed tokens ({err}); re-run the tokens stage") from None
    try:
        generator_tokens = read_generator_meta(superres_dir).get("tokens")
    except ValueError as err:  # missing or not a generator, already one line naming the file
        raise BadInputError(str(err)) from None
    if store.meta["superres"].get("tokenizer_digest") != tokenizer_digest:
        raise BadInputError(f"{tokens_dir / 'superres'}: codes come from another super-res tokenizer; "
                            "re-run the tokens stage")
    if generator_tokens != store.address("superres"):
        raise BadInputError(f"{superres_dir}: the super-res generator was trained on other tokens than "
                            f"{tokens_dir / 'superres'}; re-run the superres stage")
    return store


# --- evaluation -------------------------------------------------------------------------------------

@torch.inference_mode()
def compare(old, new, images: torch.Tensor, feature_module: nn.Module | None = None
            ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Old vs new decoder on the same codes (the frozen encoder's) of `images` [N,3,R,R]:
    PSNR, L1 and (with a feature module) reconstruction FID; plus both reconstructions."""
    from models.losses import psnr

    recon = {"old": [], "new": []}
    for batch in images.split(64):
        codes = old.encode(batch)  # [b,g,g]: the same for both decoders
        recon["old"].append(old.decode(codes).clamp(-1, 1))
        recon["new"].append(new.decode(codes).clamp(-1, 1))
    recon = {k: torch.cat(v) for k, v in recon.items()}  # [N,3,R,R] each
    metrics = {}
    for name, y in recon.items():
        metrics[f"psnr_{name}"] = float(psnr(y, images))
        metrics[f"l1_{name}"] = float((y - images).abs().mean())
    metrics["psnr_gain"] = metrics["psnr_new"] - metrics["psnr_old"]
    if feature_module is not None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=feature_module, normalize=True, reset_real_features=False)
        fid.update((images + 1) / 2, real=True)  # the feature module takes [0,1]
        for name, y in recon.items():
            fid.reset()  # keeps the real features
            fid.update((y + 1) / 2, real=False)
            metrics[f"fid_{name}"] = float(fid.compute())
    return metrics, recon["old"], recon["new"]


def write_report(path: Path, metrics: dict[str, float], old_spec, new_spec, n_images: int) -> Path:
    def row(name: str, spec) -> str:
        fid = f"{metrics[f'fid_{name}']:.4g}" if f"fid_{name}" in metrics else "n/a"
        return (f"| {name} | {list(spec.decoder_widths)} | {spec.decoder_depth} | "
                f"{int(metrics[f'decoder_parameters_{name}']):,} | {metrics[f'psnr_{name}']:.2f} | "
                f"{metrics[f'l1_{name}']:.4f} | {fid} |")

    lines = [
        "# decoder_ft: old vs new super-res decoder",
        "",
        f"{n_images} validation images, encoded once by the frozen encoder; both decoders decode the same codes.",
        "",
        "| decoder | channels | layers per block | parameters | PSNR (dB) | L1 | reconstruction FID |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        row("old", old_spec),
        row("new", new_spec),
        "",
        f"PSNR gain: {metrics['psnr_gain']:+.2f} dB",
        "",
    ]
    Path(path).write_text("\n".join(lines))
    return Path(path)


def decoder_parameters(tokenizer) -> int:
    """Parameters of the decoder side (decoder + post_quant_conv): everything that is not frozen."""
    from models.tokenizer import frozen_parameter_names

    frozen = set(frozen_parameter_names(tokenizer))
    return sum(p.numel() for name, p in tokenizer.named_parameters() if name not in frozen)


# --- the stage --------------------------------------------------------------------------------------

def run(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, tokens_dir: Path, tokenizer_dir: Path,
        base_dir: Path, superres_dir: Path, out_dir: Path, ckpt_dir: Path, feature_module: nn.Module | None = None,
        logger=None, callbacks: list | None = None) -> DecoderFinetuneResult:
    import lightning as L

    import models.tokenizer
    from models.tokenizer import frozen_parameter_names, save_tokenizer, with_larger_decoder

    dft, t, out_dir = cfg.decoder_ft, cfg.decoder_ft.train, Path(out_dir)
    source_dir = Path(tokenizer_dir) / "superres"
    source, source_digest = load_source(cfg, source_dir)
    tokens = open_tokens(tokens_dir, source_digest, Path(superres_dir))
    accepted = read_accepted(validate_dir)
    train_rows = _split(accepted, "train")
    if len(train_rows) == 0:
        raise BadInputError("decoder_ft: no accepted items in the train split")
    missing = set(train_rows["key"]) - set(tokens.keys["key"])
    if missing:
        raise BadInputError(f"{Path(tokens_dir) / KEYS_FILE}: no codes for {len(missing)} accepted training items "
                            f"(e.g. {sorted(missing)[0]!r}); re-run the tokens stage")
    val = _split(accepted, "val", dft.eval_images)
    if len(val) < 2:
        raise BadInputError(f"decoder_ft: {len(val)} accepted val items; evaluation needs at least 2")

    L.seed_everything(t.seed, workers=True, verbose=False)  # the new decoder's initialisation, same on every rank
    try:
        model = with_larger_decoder(source, dft.channels, dft.layers_per_block)
    except ValueError as err:
        raise BadInputError(f"params.yaml: decoder_ft.channels / decoder_ft.layers_per_block: {err}") from None
    res = source.spec.resolution
    dataset = CodeImageDataset(tokens, ShardImageDataset(data_dir, train_rows, res))
    run_fingerprint = fingerprint(spec=model.spec.to_dict(), train=asdict(t), tokenizer=source_digest,
                                  tokens=tokens.address("superres"), data=frame_digest(train_rows[["key", "sha256"]]),
                                  code=code_digest(models.tokenizer, sys.modules[__name__]))

    # what must not change: the copied encoder/codebook (compared with the source's) and the saved models
    before = {FROZEN_TENSORS: frozen_digest(source), **frozen_files(source_dir, base_dir, superres_dir)}
    module = _lightning_module()(model, asdict(t))
    result = fit("decoder_ft", module, dataset, t, ckpt_dir=ckpt_dir, run_fingerprint=run_fingerprint,
                 logger=logger, callbacks=callbacks)
    model = module.tokenizer.eval().float().cpu()
    check_unchanged(before, {FROZEN_TENSORS: frozen_digest(model),
                             **frozen_files(source_dir, base_dir, superres_dir)}, Path(ckpt_dir))
    in_optimizer = {id(p) for group in result.trainer.optimizers[0].param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    trainable = [n for n in frozen_parameter_names(model) if params[n].requires_grad or id(params[n]) in in_optimizer]
    if trainable:
        raise StageError(f"decoder_ft: frozen parameter {trainable[0]} was trainable")
    if result.trainer.global_rank != 0:
        return DecoderFinetuneResult({}, out_dir)

    val_images = ShardImageDataset(data_dir, val, res)
    images = torch.stack([val_images[i] for i in range(len(val_images))])  # [N,3,R,R]
    metrics, old_recon, new_recon = compare(source, model, images, feature_module)
    metrics.update({"train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
                    "decoder_parameters_old": decoder_parameters(source),
                    "decoder_parameters_new": decoder_parameters(model)})
    loss = result.trainer.callback_metrics.get("train/loss")
    if loss is not None:
        metrics["final_loss"] = float(loss)

    save_tokenizer(model, out_dir)
    n = min(8, len(images))
    save_tiled(np.concatenate([to_uint8(images[:n]), to_uint8(old_recon[:n]), to_uint8(new_recon[:n])]),
               out_dir / "comparison.png", columns=n)  # rows: original | old decoder | new decoder
    write_report(out_dir / "report.md", metrics, source.spec, model.spec, len(images))
    write_json(out_dir / "metrics.json", metrics)
    return DecoderFinetuneResult(metrics, out_dir)


def execute(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, tokens_dir: Path, tokenizer_dir: Path,
            base_dir: Path, superres_dir: Path, out_dir: Path, ckpt_dir: Path, metrics_file: Path,
            parent_run_id: str | None = None, feature_module: nn.Module | None = None) -> DecoderFinetuneResult:
    return tracked(
        "decoder_ft", cfg,
        lambda: run(cfg, data_dir, validate_dir, tokens_dir, tokenizer_dir, base_dir, superres_dir, out_dir,
                    ckpt_dir, feature_module, lightning_logger()),
        metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "decoder_ft")],
        artifacts=lambda r: [Path(out_dir) / name for name in REPORT_FILES],
        parent_run_id=parent_run_id,
    )
