"""Masked-generator training shared by the `base` and `superres` stages (Muse section 2).

Training reads only precomputed data: image tokens from the `tokens` stage and text embeddings
from the `features` stage, looked up per batch by item key. Each step:

    tokens [B, N] --mask ceil(r*N) positions, r ~ 2/pi (1 - r^2)^-1/2--> inputs [B, N]
    text [B, L, D], mask [B, L]; 10% (text_dropout) of examples lose their text (CFG)
    super-res: + the low-res token map [B, M] of the same image (never dropped)
    loss = cross-entropy on the masked positions

Random streams: model initialisation uses `seed` on every rank (identical replicas); masks and
text dropout come from a generator seeded by (seed, global rank, step) and dropout from the
global RNG reseeded with seed + rank, so ranks see different masks (XGen-Image-1: uniform seeds
made the loss erratic) and a resumed run draws the same masks it would have drawn.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from components.config import GeneratorConfig, GeneratorTrainConfig
from components.errors import BadInputError, StageError
from components.features import FeatureStore
from components.tokens import TokenStore
from components.training import adamw_warmup_cosine, code_digest, fingerprint, fit


def spec_for(cfg: GeneratorConfig, tokens: TokenStore, features: FeatureStore, which: str):
    """The generator's architecture: sizes from params, vocabulary and grids from the tokenizers."""
    from models.masked_transformer import MaskedTransformerSpec

    meta = tokens.meta[which]
    if meta["kind"] != "vqgan":
        raise BadInputError(f"{which}: masked generators need vqgan tokens, the tokens stage holds "
                            f"{meta['kind']} latents (set tokenizer.kind: vqgan)")
    m = cfg.model
    cond = {}
    if which == "superres":
        low = tokens.meta["base"]
        cond = {"cond_codebook_size": low["codebook_size"], "cond_grid": low["grid"], "cond_depth": m.cond_depth,
                "cond_add": m.cond_add}
    elif m.cond_depth or m.cond_add:
        raise BadInputError(f"base.model.cond_depth must be 0 and base.model.cond_add false (a base model has no "
                            f"low-res map), got {m.cond_depth} and {m.cond_add}")
    return MaskedTransformerSpec(
        codebook_size=meta["codebook_size"], grid=meta["grid"], text_dim=features.dim, text_length=features.max_length,
        width=m.width, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio, dropout=m.dropout, **cond)


class BatchDataset(torch.utils.data.Dataset):
    """Items fetched a whole batch at a time (__getitems__, with whole_batch as collate_fn): one
    feature lookup per batch instead of one per item."""

    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        raise NotImplementedError


class TokenTextDataset(BatchDataset):
    """Precomputed (tokens, text, low-res tokens) by item key."""

    def __init__(self, tokens: TokenStore, features: FeatureStore, keys: list[str], which: str):
        self.tokens, self.features, self.keys, self.which = tokens, features, list(keys), which

    def __getitems__(self, indices: list[int]) -> dict:
        keys = [self.keys[i] for i in indices]
        text, text_mask = self.features.lookup(keys)  # [B,L,D], [B,L]
        batch = {"tokens": self.tokens.lookup(self.which, keys).flatten(1), "text": text, "text_mask": text_mask}
        if self.which == "superres":
            batch["cond_tokens"] = self.tokens.lookup("base", keys).flatten(1)  # [B, M]
        return batch


def whole_batch(batch: dict) -> dict:
    """collate_fn: __getitems__ already returns the batch."""
    return batch


def _lightning_module():
    """Built lazily: importing Lightning costs seconds that `cascade --help` should not pay."""
    import lightning as L

    from models.masked_transformer import MaskedTransformer, MaskedTransformerSpec, masked_token_loss

    class GeneratorModule(L.LightningModule):
        def __init__(self, spec: dict, train: dict, stage: str):
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.train_cfg = GeneratorTrainConfig(**train)
            self.stage = stage
            self.model = MaskedTransformer(MaskedTransformerSpec.from_dict(spec))
            self.last_masked: torch.Tensor | None = None  # the last step's mask, for inspection (tests)

        def configure_optimizers(self):
            return adamw_warmup_cosine(self.model, self.train_cfg)

        def on_train_start(self) -> None:
            # dropout draws from the global RNG: per rank, and moved on by the resumed step
            torch.manual_seed(self.train_cfg.seed + 1000 * self.global_rank + 7919 * self.global_step)

        def step_generator(self) -> torch.Generator:
            t = self.train_cfg
            return torch.Generator().manual_seed(hash_seed(t.seed, self.global_rank, self.global_step))

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            t, spec = self.train_cfg, self.model.spec
            tokens = batch["tokens"]  # [B,N]
            B, N = tokens.shape
            masked, dropped = draw_masks(self.step_generator(), B, N, t.text_dropout)
            masked, dropped = masked.to(tokens.device), dropped.to(tokens.device)
            text_mask = batch["text_mask"] & ~dropped[:, None]
            inputs = tokens.masked_fill(masked, spec.mask_id)
            logits = self.model(inputs, batch["text"], text_mask, batch.get("cond_tokens"))  # [B,N,K]
            loss = masked_token_loss(logits, tokens, masked)
            if not torch.isfinite(loss):
                raise StageError(f"{self.stage}: loss became {loss.item()} at step {self.global_step}; training "
                                 f"stopped, the last good checkpoint is kept in {self.trainer.default_root_dir}")
            self.last_masked = masked.detach()
            with torch.no_grad():
                accuracy = (logits[masked].argmax(-1) == tokens[masked]).float().mean()
            self.log_dict({"train/loss": loss.detach(), "train/masked_accuracy": accuracy}, on_step=True, prog_bar=True)
            return loss

    return GeneratorModule


def draw_masks(g: torch.Generator, batch: int, n_tokens: int, text_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's random draws: masked [B, N] bool (Muse rate schedule) and text dropped [B] bool."""
    from models.masked_transformer import random_token_mask, sample_mask_rates

    masked = random_token_mask(sample_mask_rates(batch, g), n_tokens, g)
    dropped = torch.rand(batch, generator=g) < text_dropout
    return masked, dropped


def hash_seed(seed: int, rank: int, step: int) -> int:
    """One 63-bit seed per (seed, rank, step), stable across processes (unlike hash())."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def fit_generator(stage: str, module, dataset, t: GeneratorTrainConfig, ckpt_dir: Path, run_fingerprint: str,
                  logger=None, callbacks: list | None = None):
    """components.training.fit for a generator of either family: batches from __getitems__, gradient
    clipping and the optional EMA of weights from the training config."""
    extra = list(callbacks or [])
    if t.ema_decay > 0:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        extra.append(EMAWeightAveraging(decay=t.ema_decay))
    return fit(stage, module, dataset, t, ckpt_dir=ckpt_dir, run_fingerprint=run_fingerprint, logger=logger,
               callbacks=extra, collate_fn=whole_batch, gradient_clip_val=t.grad_clip or None)


@dataclass(frozen=True)
class TrainedGenerator:
    model: object  # models.masked_transformer.MaskedTransformer, eval mode, on CPU (rank 0) or None
    metrics: dict[str, float]


def train(cfg: GeneratorConfig, which: str, tokens_dir: Path, features_dir: Path, out_dir: Path, ckpt_dir: Path,
          logger=None, callbacks: list | None = None) -> TrainedGenerator:
    """Train the `which` ("base" | "superres") generator; export it to out_dir (rank 0)."""
    import lightning as L

    import models.masked_transformer
    from models.masked_transformer import save_generator

    t = cfg.train
    tokens, features = open_stores(tokens_dir, features_dir)
    spec = spec_for(cfg, tokens, features, which)
    keys = tokens.keys[tokens.keys["split"] == "train"]["key"].tolist()
    if not keys:
        raise BadInputError(f"{which}: no accepted items in the train split")
    if t.batch_size > len(keys):
        raise BadInputError(f"{which}.train.batch_size {t.batch_size} exceeds the {len(keys)} training items")
    dataset = TokenTextDataset(tokens, features, keys, which)
    run_fingerprint = fingerprint(spec=spec.to_dict(), train=asdict(t), tokens=tokens.address(which),
                                  code=code_digest(models.masked_transformer, sys.modules[__name__]),
                                  cond=tokens.address("base") if which == "superres" else None,
                                  features=features.fingerprint)

    L.seed_everything(t.seed, workers=True, verbose=False)  # identical initialisation on every rank
    module = _lightning_module()(spec.to_dict(), asdict(t), which)
    result = fit_generator(which, module, dataset, t, ckpt_dir, run_fingerprint, logger, callbacks)
    if result.trainer.global_rank != 0:
        return TrainedGenerator(None, {})
    model = module.model.eval().float().cpu()
    save_generator(model, Path(out_dir), extra={"sample": asdict(cfg.sample), "tokens": tokens.address(which),
                                                "text_encoder": features.encoder})
    metrics = {"train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
               "tokens_per_second": (t.steps - result.resumed_from) * t.batch_size * spec.n_tokens
               / max(result.seconds, 1e-9),
               "parameters": sum(p.numel() for p in model.parameters())}
    loss = result.trainer.callback_metrics.get("train/loss")
    if loss is not None:
        metrics["final_loss"] = float(loss)
    return TrainedGenerator(model, metrics)


def open_stores(tokens_dir: Path, features_dir: Path) -> tuple[TokenStore, FeatureStore]:
    tokens_dir = Path(tokens_dir)
    if not (tokens_dir / "keys.parquet").is_file():
        raise BadInputError(f"{tokens_dir}: no precomputed tokens here; run the tokens stage first (cascade stage tokens)")
    tokens, features = TokenStore(tokens_dir), FeatureStore.open(features_dir)
    if tokens.keys["key"].tolist() != features.keys():
        raise BadInputError(f"{tokens_dir} and {features_dir} were computed for different accepted sets; "
                            "re-run the features and tokens stages")
    return tokens, features



@dataclass(frozen=True)
class GeneratorResult:
    metrics: dict[str, float]
    out_dir: Path


REPORT_FILES = ("generator.json", "samples.png", "samples.txt", "checker.md")


def report_files(out_dir: Path) -> list[Path]:
    """What the stage logs to MLflow besides its metrics."""
    return [Path(out_dir) / name for name in REPORT_FILES]
