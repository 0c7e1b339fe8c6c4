"""Stage `decoder_ft`: Muse decoder finetuning for the tokenizer whose decoder makes the cascade's pixels.

A larger decoder (more channels and residual layers, from params) is trained to reconstruct the
training images from the tokenizer's precomputed codes, while everything that defines the codes
stays frozen: the encoder, quant_conv and codebook (their grads are off and they are not in the
optimizer) and the generators. Their tensors and files are digested before and after training; any
change fails the stage. Which tokenizer depends on `generator.family`:

    masked:    the super-res VQGAN (tokenizer/superres) on its codes (tokens/superres) at the super-res
               resolution; frozen files: that VQGAN and the base and super-res generators
    diffusion: the base KL-VAE (tokenizer/base) on its latents (tokens/base) at the base resolution:
               its decoder turns the base model's latents into the low-res images the pixel super-res
               model upsamples; frozen files: that KL-VAE and the base and super-res diffusion models

    vqgan: codes [B,g,g] --codebook--> post_quant_conv + new decoder --> images [B,3,R,R]
    kl:    latents [B,C,g,g] --------> post_quant_conv + new decoder --> images [B,3,R,R]
    loss = l1_weight * L1 + l2_weight * MSE against the shard images in [-1,1]

out_dir is a normal tokenizer directory (tokenizer.safetensors + tokenizer.json, same encoder,
codebook and grid, so the generator's tokens / latents decode unchanged) plus metrics.json,
comparison.png (rows: original | old decoder | new decoder) and report.md: validation PSNR / L1 /
reconstruction FID of the old and new decoder on the same codes. The new decoder ships only if its
PSNR gain reaches `decoder_ft.min_psnr_gain`; otherwise out_dir carries the tokenizer's own decoder
(metrics `new_decoder_shipped` 0, a warning and the report say so), so downstream never decodes
with a worse one.
"""

from __future__ import annotations

import hashlib
import logging
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
FROZEN_TENSORS = "encoder, quant_conv and codebook"  # the VQGAN's; a KL-VAE has no codebook
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """The tokenizer decoder finetuning trains for one generator family, and what is frozen with it."""

    family: str
    which: str  # tokenizer/<which> and tokens/<which>
    kind: str  # the tokenizer kind the family's generators work on
    title: str  # the decoder, in reports and errors
    codes: str  # what the tokens stage stored for it
    frozen_tensors: str  # the tensors that fix the codes
    models: tuple[str, str]  # the base and super-res models, in errors


TARGETS = {
    "masked": Target("masked", "superres", "vqgan", "super-res VQGAN", "codes", FROZEN_TENSORS,
                     ("base generator", "super-res generator")),
    "diffusion": Target("diffusion", "base", "kl", "base KL-VAE", "latents", "encoder and quant_conv",
                        ("base diffusion model", "super-res diffusion model")),
}


def target_for(cfg: CascadeConfig) -> Target:
    """masked: the super-res VQGAN (its decoder turns the super-res generator's tokens into pixels);
    diffusion: the base KL-VAE (its decoder makes the low-res images the pixel super-res model upsamples)."""
    return TARGETS[cfg.generator.family]


@dataclass(frozen=True)
class DecoderFinetuneResult:
    metrics: dict[str, float]
    out_dir: Path


class CodeImageDataset(torch.utils.data.Dataset):
    """Item i: (its precomputed codes: a token map [g,g] long (vqgan) or latents [C,g,g] float (kl),
    its image [3,R,R] in [-1,1])."""

    def __init__(self, tokens: TokenStore, images: ShardImageDataset, which: str = "superres"):
        self.tokens, self.images, self.which = tokens, images, which

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens.lookup(self.which, [self.images.keys[index]])[0], self.images[index]


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
            codes, images = batch  # [B,g,g] codes or [B,C,g,g] latents, [B,3,R,R]
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
    """sha256 over the encoder, quant_conv and (vqgan) codebook tensors (names and bytes)."""
    from models.tokenizer import frozen_parameter_names

    h = hashlib.sha256()
    params = dict(tokenizer.named_parameters())
    for name in frozen_parameter_names(tokenizer):
        h.update(name.encode() + b"\0")
        h.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def frozen_files(tokenizer_dir: Path, base_dir: Path, superres_dir: Path,
                 target: Target = TARGETS["masked"]) -> dict[str, str]:
    """Digests of the saved models decoder finetuning must not touch, by what to name in an error."""
    from models.diffusion import diffusion_digest
    from models.masked_transformer import generator_digest
    from models.tokenizer import tokenizer_digest

    model_digest = diffusion_digest if target.family == "diffusion" else generator_digest
    base_name, superres_name = target.models
    try:
        return {f"{target.title} {tokenizer_dir}": tokenizer_digest(tokenizer_dir),
                f"{base_name} {base_dir}": model_digest(base_dir),
                f"{superres_name} {superres_dir}": model_digest(superres_dir)}
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
    """The trained tokenizer whose decoder is finetuned (the family's kind only) and its digest;
    params checked against it."""
    from models.tokenizer import load_tokenizer, tokenizer_digest

    target = target_for(cfg)
    try:
        source, digest = load_tokenizer(directory), tokenizer_digest(directory)
    except ValueError as err:
        raise BadInputError(str(err)) from None
    if source.spec.kind != target.kind:
        if target.family == "masked":
            raise BadInputError(f"{directory / 'tokenizer.json'}: a {source.spec.kind} tokenizer; decoder finetuning "
                                "(Muse) trains a decoder for the VQGAN's discrete codes (set tokenizer.kind: vqgan)")
        raise BadInputError(f"{directory / 'tokenizer.json'}: a {source.spec.kind} tokenizer; the diffusion "
                            "family's decoder finetuning trains the base KL-VAE's decoder on its latents "
                            "(set tokenizer.kind: kl and re-run tokenizer, tokens, base, superres)")
    widths = source.spec.decoder_widths
    if len(cfg.decoder_ft.channels) != len(widths):
        raise BadInputError(f"params.yaml: decoder_ft.channels {list(cfg.decoder_ft.channels)} needs {len(widths)} "
                            f"entries, one per block of the {target.title}'s decoder {list(widths)}")
    return source, digest


def open_tokens(tokens_dir: Path, tokenizer_digest: str, superres_dir: Path, base_dir: Path | None = None,
                target: Target = TARGETS["masked"]) -> TokenStore:
    """The precomputed codes of the target tokenizer, checked to come from this tokenizer and to be
    what the generator reading them was trained on: masked, the super-res generator (superres_dir);
    diffusion, the base diffusion model (base_dir; the pixel super-res model reads no tokens)."""
    from models.diffusion import read_diffusion_meta
    from models.masked_transformer import read_generator_meta

    tokens_dir = Path(tokens_dir)
    if not (tokens_dir / KEYS_FILE).is_file():
        raise BadInputError(f"{tokens_dir / KEYS_FILE}: missing; run the tokens stage first (cascade stage tokens)")
    try:
        store = TokenStore(tokens_dir)
    except (OSError, ValueError, KeyError) as err:
        raise BadInputError(f"{tokens_dir}: unreadable precomputed tokens ({err}); re-run the tokens stage") from None
    which, (base_name, superres_name) = target.which, target.models
    if target.family == "diffusion":
        reader, model_dir, model_name, stage = read_diffusion_meta, Path(base_dir), base_name, "base"
    else:
        reader, model_dir, model_name, stage = read_generator_meta, Path(superres_dir), superres_name, "superres"
    try:
        model_tokens = reader(model_dir).get("tokens")
    except ValueError as err:  # missing or not that kind of model, already one line naming the file
        raise BadInputError(str(err)) from None
    meta = store.meta.get(which)
    if meta is None:
        raise BadInputError(f"{tokens_dir / which}: no precomputed {target.codes} for the {target.title}; "
                            "re-run the tokens stage")
    if meta.get("tokenizer_digest") != tokenizer_digest:
        raise BadInputError(f"{tokens_dir / which}: {target.codes} come from another {target.title}; "
                            "re-run the tokens stage")
    if model_tokens != store.address(which):
        raise BadInputError(f"{model_dir}: the {model_name} was trained on other "
                            f"{target.codes} than {tokens_dir / which}; re-run the {stage} stage")
    return store


# --- evaluation -------------------------------------------------------------------------------------

@torch.inference_mode()
def compare(old, new, images: torch.Tensor, feature_module: nn.Module | None = None
            ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Old vs new decoder on the same codes or latents (the frozen encoder's) of `images` [N,3,R,R]:
    PSNR, L1 and (with a feature module) reconstruction FID; plus both reconstructions."""
    from models.losses import psnr

    recon = {"old": [], "new": []}
    for batch in images.split(64):
        codes = old.encode(batch)  # [b,g,g] codes or [b,C,g,g] latents: the same for both decoders
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


def ships_new_decoder(metrics: dict[str, float], min_psnr_gain: float | None) -> bool:
    """Whether the stage's output carries the new decoder: its val PSNR gain reaches min_psnr_gain
    (null: always). A from-scratch decoder with too few steps can fall below the tokenizer's own."""
    return min_psnr_gain is None or metrics["psnr_gain"] >= min_psnr_gain


def write_report(path: Path, metrics: dict[str, float], old_spec, new_spec, n_images: int,
                 target: Target = TARGETS["masked"], min_psnr_gain: float | None = None) -> Path:
    def row(name: str, spec) -> str:
        fid = f"{metrics[f'fid_{name}']:.4g}" if f"fid_{name}" in metrics else "n/a"
        return (f"| {name} | {list(spec.decoder_widths)} | {spec.decoder_depth} | "
                f"{int(metrics[f'decoder_parameters_{name}']):,} | {metrics[f'psnr_{name}']:.2f} | "
                f"{metrics[f'l1_{name}']:.4f} | {fid} |")

    lines = [
        f"# decoder_ft: old vs new {target.title} decoder",
        "",
        f"{n_images} validation images, encoded once by the frozen encoder; both decoders decode the same "
        f"{target.codes}.",
        "",
        "| decoder | channels | layers per block | parameters | PSNR (dB) | L1 | reconstruction FID |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        row("old", old_spec),
        row("new", new_spec),
        "",
        f"PSNR gain: {metrics['psnr_gain']:+.2f} dB",
        "",
    ]
    if metrics.get("new_decoder_shipped", 1.0):
        lines += ["Shipped: the **new** decoder" + ("" if min_psnr_gain is None else
                                                  f" (PSNR gain at least decoder_ft.min_psnr_gain {min_psnr_gain:g} dB)"), ""]
    else:
        lines += [f"Shipped: the tokenizer's **old** decoder: the new one's PSNR gain is below "
                  f"decoder_ft.min_psnr_gain {min_psnr_gain:g} dB (train it longer, or set null to ship it anyway).",
                  ""]
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

    dft, t, out_dir, target = cfg.decoder_ft, cfg.decoder_ft.train, Path(out_dir), target_for(cfg)
    source_dir = Path(tokenizer_dir) / target.which
    source, source_digest = load_source(cfg, source_dir)
    tokens = open_tokens(tokens_dir, source_digest, Path(superres_dir), Path(base_dir), target)
    accepted = read_accepted(validate_dir)
    train_rows = _split(accepted, "train")
    if len(train_rows) == 0:
        raise BadInputError("decoder_ft: no accepted items in the train split")
    missing = set(train_rows["key"]) - set(tokens.keys["key"])
    if missing:
        raise BadInputError(f"{Path(tokens_dir) / KEYS_FILE}: no {target.codes} for {len(missing)} accepted training "
                            f"items (e.g. {sorted(missing)[0]!r}); re-run the tokens stage")
    val = _split(accepted, "val", dft.eval_images)
    if len(val) < 2:
        raise BadInputError(f"decoder_ft: {len(val)} accepted val items; evaluation needs at least 2")

    L.seed_everything(t.seed, workers=True, verbose=False)  # the new decoder's initialisation, same on every rank
    try:
        model = with_larger_decoder(source, dft.channels, dft.layers_per_block)
    except ValueError as err:
        raise BadInputError(f"params.yaml: decoder_ft.channels / decoder_ft.layers_per_block: {err}") from None
    res = source.spec.resolution
    dataset = CodeImageDataset(tokens, ShardImageDataset(data_dir, train_rows, res), target.which)
    run_fingerprint = fingerprint(spec=model.spec.to_dict(), train=asdict(t), tokenizer=source_digest,
                                  tokens=tokens.address(target.which), data=frame_digest(train_rows[["key", "sha256"]]),
                                  code=code_digest(models.tokenizer, sys.modules[__name__]))

    # what must not change: the copied encoder/codebook (compared with the source's) and the saved models
    frozen = target.frozen_tensors
    before = {frozen: frozen_digest(source), **frozen_files(source_dir, base_dir, superres_dir, target)}
    module = _lightning_module()(model, asdict(t))
    result = fit("decoder_ft", module, dataset, t, ckpt_dir=ckpt_dir, run_fingerprint=run_fingerprint,
                 logger=logger, callbacks=callbacks)
    model = module.tokenizer.eval().float().cpu()
    check_unchanged(before, {frozen: frozen_digest(model),
                             **frozen_files(source_dir, base_dir, superres_dir, target)}, Path(ckpt_dir))
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

    shipped = ships_new_decoder(metrics, dft.min_psnr_gain)
    metrics["new_decoder_shipped"] = float(shipped)
    if not shipped:  # the cascade decodes with out_dir: a worse decoder must not reach evaluate or the registry
        log.warning("decoder_ft: the new %s decoder's PSNR gain over the tokenizer's own is %+.2f dB on %d val "
                    "images, below decoder_ft.min_psnr_gain %g; %s ships the tokenizer's decoder instead",
                    target.title, metrics["psnr_gain"], len(images), dft.min_psnr_gain, out_dir)
    save_tokenizer(model if shipped else source, out_dir)
    n = min(8, len(images))
    save_tiled(np.concatenate([to_uint8(images[:n]), to_uint8(old_recon[:n]), to_uint8(new_recon[:n])]),
               out_dir / "comparison.png", columns=n)  # rows: original | old decoder | new decoder
    write_report(out_dir / "report.md", metrics, source.spec, model.spec, len(images), target, dft.min_psnr_gain)
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
