"""Stage `evaluator`: train the domain evaluator (models.evaluator) once on the accepted train split.

Each step draws a batch of training items: images from the shards (resized to
evaluator.resolution, in [0,1]) and the frozen text features of their captions from the features
stage. The loss is symmetric InfoNCE in which items sharing a caption (same caption sha256) are all
positives. No augmentation: the evaluator is a fixed, deterministic yardstick. With
train.devices > 1 each rank contrasts its own batch (no all-gather of embeddings).

After training, the val split checks that it learned the alignment it is meant to measure:
top-1 retrieval image->caption over the val split's unique captions and caption->image, the
CLIP score of matched pairs vs shuffled pairs, and the contrastive loss. Exports
out_dir/evaluator.safetensors + evaluator.json (recording the text encoder's fingerprint and the
training data's digest, so scores stay comparable) and out_dir/metrics.json.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from components.config import CascadeConfig, EvaluatorConfig, EvaluatorTrainConfig
from components.errors import BadInputError, StageError
from components.features import FeatureStore
from components.generator import whole_batch
from components.images import ShardImageDataset
from components.io import ACCEPTED_FILE, frame_digest, write_json
from components.io import read_accepted as _read_accepted
from components.stage import TrackedInput, tracked
from components.tracking import lightning_logger
from components.training import code_digest, fingerprint, fit, warmup_cosine

COLUMNS = ["key", "shard", "image_member", "sha256", "split", "width", "height"]


@dataclass(frozen=True)
class EvaluatorResult:
    metrics: dict[str, float]
    out_dir: Path


class ImageTextDataset(torch.utils.data.Dataset):
    """Items of one split as whole batches: images [B,3,R,R] in [0,1], text [B,L,D], text_mask [B,L],
    caption_ids [B] long (equal ids = equal captions)."""

    def __init__(self, images: ShardImageDataset, features: FeatureStore, caption_ids: torch.Tensor):
        self.images, self.features, self.caption_ids = images, features, caption_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        text, text_mask = self.features.lookup([self.images.keys[i] for i in indices])
        images = torch.stack([self.images[i] for i in indices])  # [B,3,R,R] in [-1,1]
        return {"images": (images + 1) / 2, "text": text, "text_mask": text_mask,
                "caption_ids": self.caption_ids[indices]}


def _lightning_module():
    """Built lazily: importing Lightning costs seconds that `cascade --help` should not pay."""
    import lightning as L

    from models.evaluator import DomainEvaluator, EvaluatorSpec, contrastive_loss

    class EvaluatorModule(L.LightningModule):
        def __init__(self, spec: dict, train: dict):
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.train_cfg = EvaluatorTrainConfig(**train)
            self.model = DomainEvaluator(EvaluatorSpec.from_dict(spec))

        def configure_optimizers(self):
            t = self.train_cfg
            decay, rest = [], []  # weight decay on matrices and kernels, not on norms, biases, the scale
            for p in self.model.parameters():
                (decay if p.ndim >= 2 else rest).append(p)
            optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                           {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
            return {"optimizer": optimizer, "lr_scheduler": warmup_cosine(optimizer, t.warmup_steps, t.steps)}

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            image = self.model.image_features(batch["images"])  # [B,E]
            text = self.model.text_features(batch["text"], batch["text_mask"])  # [B,E]
            loss = contrastive_loss(image, text, self.model.scale, batch["caption_ids"])
            if not torch.isfinite(loss):
                raise StageError(f"evaluator: loss became {loss.item()} at step {self.global_step}; the last "
                                 f"good checkpoint is kept in {self.trainer.default_root_dir}")
            self.log_dict({"train/loss": loss.detach(), "train/scale": self.model.scale.detach()},
                          on_step=True, prog_bar=True)
            return loss

    return EvaluatorModule


def _inputs(cfg: EvaluatorConfig, validate_dir: Path, features_dir: Path) -> tuple[pd.DataFrame, FeatureStore]:
    """Accepted rows (+ caption_sha256) and the feature store, checked against each other and the config."""
    accepted_path = Path(validate_dir) / ACCEPTED_FILE
    accepted = _read_accepted(validate_dir, COLUMNS)
    features = FeatureStore.open(features_dir)
    if accepted["key"].tolist() != features.keys():
        raise BadInputError(f"{accepted_path} and {features_dir} list different items; re-run the features stage")
    accepted = accepted.assign(caption_sha256=features.items["caption_sha256"].to_numpy())
    small = accepted[accepted[["width", "height"]].min(axis=1) < cfg.resolution]
    if len(small):
        row = small.iloc[0]
        raise BadInputError(f"{accepted_path}: item {row['key']!r} is {row['width']}x{row['height']}, smaller than "
                            f"evaluator.resolution {cfg.resolution} ({len(small)} such items); lower the resolution "
                            f"or raise validate.min_side")
    return accepted, features


def _split(data_dir: Path, validate_dir: Path, accepted: pd.DataFrame, features: FeatureStore, split: str,
           resolution: int) -> ImageTextDataset:
    rows = accepted[accepted["split"] == split]
    if len(rows) == 0:
        raise BadInputError(f"{Path(validate_dir) / ACCEPTED_FILE}: no accepted items in the {split} split "
                            "(the evaluator trains on train and is checked on val)")
    codes, _ = pd.factorize(rows["caption_sha256"])  # same caption -> same id, in order of appearance
    return ImageTextDataset(ShardImageDataset(data_dir, rows, resolution), features, torch.from_numpy(codes).long())


def run(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, features_dir: Path, out_dir: Path, ckpt_dir: Path,
        logger=None, callbacks: list | None = None) -> EvaluatorResult:
    """Train the domain evaluator on the train split, check it on val, export it to out_dir (rank 0)."""
    import lightning as L

    import models.evaluator
    from models.evaluator import EvaluatorSpec, save_evaluator

    ev, out_dir = cfg.evaluator, Path(out_dir)
    t = ev.train
    accepted, features = _inputs(ev, validate_dir, features_dir)
    train_set = _split(Path(data_dir), validate_dir, accepted, features, "train", ev.resolution)
    val_set = _split(Path(data_dir), validate_dir, accepted, features, "val", ev.resolution)
    if t.batch_size > len(train_set):
        raise BadInputError(f"evaluator.train.batch_size {t.batch_size} exceeds the {len(train_set)} training items")
    spec = EvaluatorSpec(resolution=ev.resolution, channels=tuple(ev.channels), embed_dim=ev.embed_dim,
                         text_dim=features.dim)
    train_rows = accepted[accepted["split"] == "train"][["key", "sha256", "caption_sha256"]]
    data = frame_digest(train_rows)
    run_fingerprint = fingerprint(spec=spec.to_dict(), train=asdict(t), data=data, features=features.fingerprint,
                                  code=code_digest(models.evaluator, sys.modules[__name__]))

    L.seed_everything(t.seed, workers=True, verbose=False)  # identical initialisation on every rank
    module = _lightning_module()(spec.to_dict(), asdict(t))
    result = fit("evaluator", module, train_set, t, ckpt_dir=Path(ckpt_dir), run_fingerprint=run_fingerprint,
                 logger=logger, callbacks=callbacks, collate_fn=whole_batch)
    if result.trainer.global_rank != 0:
        return EvaluatorResult({}, out_dir)
    model = module.model.eval().float().cpu()
    save_evaluator(model, out_dir, {"text_encoder_fingerprint": features.fingerprint, "text_encoder": features.encoder,
                                    "data_digest": data, "train_items": len(train_set), "steps": t.steps})
    metrics = evaluate(model, val_set, t.batch_size)
    metrics.update({"train_seconds": result.seconds, "resumed_from_step": result.resumed_from,
                    "parameters": sum(p.numel() for p in model.parameters())})
    write_json(out_dir / "metrics.json", metrics)
    return EvaluatorResult(metrics, out_dir)


@torch.inference_mode()
def evaluate(model, val: ImageTextDataset, batch_size: int) -> dict[str, float]:
    """Retrieval, CLIP score and contrastive loss of `model` on one split (see the module doc)."""
    from models.evaluator import contrastive_loss

    ids = val.caption_ids  # [N]
    image, text = [], []  # -> [N,E] each
    for start in range(0, len(val), batch_size):
        batch = val.__getitems__(list(range(start, min(start + batch_size, len(val)))))
        image.append(model.image_features(batch["images"]))
        text.append(model.text_features(batch["text"], batch["text_mask"]))
    image, text = torch.cat(image), torch.cat(text)
    n_captions = int(ids.max()) + 1
    first = torch.full((n_captions,), len(ids)).scatter_reduce(0, ids, torch.arange(len(ids)), "amin")
    captions = text[first]  # [U,E]: one row per unique caption (its first item's)
    similarity = image @ captions.t()  # [N,U]
    i2t = (similarity.argmax(1) == ids).float().mean()  # an image finds its own caption
    t2i = (ids[similarity.argmax(0)] == torch.arange(n_captions)).float().mean()  # a caption finds one of its images
    shuffled = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))  # fixed: comparable runs

    def clip_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # = DomainEvaluator.clip_score, per row
        return 100 * (a * b).sum(-1).clamp(min=0)

    # in batches of the training size, so that it compares with train/loss; weighted by batch length
    loss = sum(len(i) * contrastive_loss(a, b, model.scale, i)
               for a, b, i in zip(image.split(batch_size), text.split(batch_size), ids.split(batch_size))) / len(ids)
    return {"retrieval_i2t_top1": float(i2t), "retrieval_t2i_top1": float(t2i), "retrieval_chance": 1 / n_captions,
            "clip_score_matched": float(clip_score(image, text).mean()),
            "clip_score_shuffled": float(clip_score(image, text[shuffled]).mean()),
            "val_loss": float(loss)}


def load_for_scoring(evaluator_dir: Path, features_dir: Path | None = None):
    """The exported evaluator (models.evaluator.DomainEvaluator, eval mode); with `features_dir`, refuses
    text features from another encoder than the one it was trained against (its scores would be noise)."""
    from models.evaluator import load_evaluator, read_evaluator_meta

    try:
        model, meta = load_evaluator(evaluator_dir), read_evaluator_meta(evaluator_dir)
    except ValueError as err:
        raise BadInputError(f"evaluator: {err}; re-run the evaluator stage") from None
    if features_dir is not None:
        store = FeatureStore.open(features_dir)
        trained = meta.get("text_encoder_fingerprint")
        if store.fingerprint != trained:
            raise BadInputError(f"{evaluator_dir} was trained against text encoder {str(trained)[:12]}, but "
                                f"{features_dir} holds features of encoder {store.fingerprint[:12]}; re-run the "
                                "evaluator stage on these features")
    return model


def execute(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, features_dir: Path, out_dir: Path, ckpt_dir: Path,
            metrics_file: Path, parent_run_id: str | None = None) -> EvaluatorResult:
    return tracked(
        "evaluator", cfg,
        lambda: run(cfg, data_dir, validate_dir, features_dir, out_dir, ckpt_dir, lightning_logger()),
        metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "evaluator")],
        artifacts=lambda r: [Path(out_dir) / "metrics.json", Path(out_dir) / "evaluator.json"],
        parent_run_id=parent_run_id,
    )
