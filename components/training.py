"""Lightning plumbing shared by the training stages (tokenizer, base, superres).

Checkpoints live outside the stage's DVC outputs (Layout.checkpoints), keyed by a fingerprint of
everything that defines the run (spec, training config, data), so a killed run resumes from
`last.ckpt` and a changed config starts afresh. `fit` runs the Trainer with a checkpoint every N
steps plus a final one, and reports where this process started (> 0 after a resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from components.config import TrainLoopConfig
from components.errors import StageError
from components.io import write_json
from components.stage import is_rank_zero


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> dict:
    """Lightning's lr_scheduler entry for lr_factor, stepped every optimizer step."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
    return {"scheduler": schedule, "interval": "step"}


def adamw_warmup_cosine(model: torch.nn.Module, t) -> dict:
    """AdamW with weight decay on matrices only (not embeddings, norms, biases) and the warm-up +
    cosine schedule: the generators' optimizer. t: a config with lr, betas, weight_decay, warmup_steps, steps."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
    return {"optimizer": optimizer, "lr_scheduler": warmup_cosine(optimizer, t.warmup_steps, t.steps)}


def fingerprint(**parts) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def code_digest(*modules) -> str:
    """sha256 of the modules' source files: training code that changed must not resume old checkpoints
    (DVC re-runs a stage when its code changes; the stage must then train, not re-export)."""
    h = hashlib.sha256(Path(__file__).read_bytes())  # this loop's code counts too
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def prepare_checkpoints(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, or None; wipes checkpoints made under another fingerprint."""
    marker, last = ckpt_dir / "fingerprint.json", ckpt_dir / "last.ckpt"
    old = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
    if not is_rank_zero():  # rank 0 owns the folder; the others only read what it decided
        return last if old == fingerprint and last.is_file() else None
    if ckpt_dir.exists() and old != fingerprint:
        shutil.rmtree(ckpt_dir)  # another spec, config or dataset: resuming it would be wrong
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    return last if last.is_file() else None


def process_grid(devices: int) -> tuple[int, int]:
    """(devices per node, nodes): from torchrun's environment when it launched us (a Kubeflow
    TrainJob sets the grid), else the params' `train.devices` on one node."""
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if world and local:
        world, local = int(world), int(local)
        if world % local:
            raise StageError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local}")
        return local, world // local
    return devices, 1


def per_process_batch(stage: str, batch_size: int, processes: int) -> int:
    """`train.batch_size` is the global batch (as in the papers): the same params train the same
    way on 1 GPU or 4 nodes x 8; each process takes an equal share."""
    if batch_size % processes:
        raise StageError(f"{stage}.train.batch_size {batch_size} is the global batch and must split evenly "
                         f"over {processes} processes (devices x nodes)")
    return batch_size // processes


def precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def quiet_lightning() -> None:
    # Lightning's start-up chatter (accelerator banner, a product tip) and a deprecation inside
    # Lightning itself would bury the stage's own output.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # "`weights_only` was not set" at every checkpoint save: full checkpoints are what resume needs
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # Resuming mid-run warns that the dataloader is not resumable. Batches are drawn with replacement
    # (fit's sampler), so the draws a resumed run makes afresh are as good as the ones it lost.
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")


@dataclass(frozen=True)
class FitResult:
    trainer: object  # lightning.Trainer
    seconds: float
    resumed_from: int  # global step this process started at (0 = from scratch)


def fit(stage: str, module, dataset, loop: TrainLoopConfig, *, ckpt_dir: Path, run_fingerprint: str, logger=None,
        callbacks: list | None = None, collate_fn=None, find_unused_parameters: bool = False,
        gradient_clip_val: float | None = None) -> FitResult:
    """Train `module` on `dataset` for `loop.steps` optimizer steps (batches drawn with replacement)
    with checkpoint/resume; raises StageError if it stops early."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

    class StartStep(Callback):  # where this process began: > 0 when it resumed a checkpoint
        step: int | None = None  # stays None when a finished checkpoint leaves nothing to train

        def on_train_start(self, trainer, pl_module) -> None:
            self.step = trainer.global_step

    class StageProgressBar(RichProgressBar):
        # the run is one step-bound epoch (max_epochs=-1), so Lightning's "Epoch 0/-2" says nothing
        def _get_train_description(self, current_epoch: int) -> str:
            return f"{stage}: steps"

    quiet_lightning()
    ckpt_dir = Path(ckpt_dir)
    resume = prepare_checkpoints(ckpt_dir, run_fingerprint)
    devices, num_nodes = process_grid(loop.devices)
    per_process = per_process_batch(stage, loop.batch_size, devices * num_nodes)
    # Lightning splits this sampler over the processes: each draws steps x per_process examples.
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=loop.steps * loop.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_process, sampler=sampler, drop_last=True,
                                         collate_fn=collate_fn, num_workers=loop.num_workers,
                                         persistent_workers=loop.num_workers > 0)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=loop.checkpoint_every, save_last=True,
                                 save_top_k=0, enable_version_counter=False)
    start_step = StartStep()
    # redrawing the bar every step cost 2% of a tokenizer step on a CPU (bench_tokenizer); ~500 redraws a run
    progress = StageProgressBar(refresh_rate=max(1, loop.steps // 500))
    strategy = "auto"
    if devices * num_nodes > 1:
        strategy = "ddp_find_unused_parameters_true" if find_unused_parameters else "ddp"
    trainer = L.Trainer(
        max_steps=loop.steps, max_epochs=-1, accelerator="auto", devices=devices, num_nodes=num_nodes,
        strategy=strategy,
        precision=precision(loop.precision), callbacks=[checkpoint, start_step, progress, *(callbacks or [])],
        logger=logger or False, default_root_dir=ckpt_dir, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=gradient_clip_val, limit_val_batches=0, log_every_n_steps=max(1, min(50, loop.steps // 10)), enable_progress_bar=True,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    # The final state too (checkpoint_every need not divide steps): a re-run then finds the
    # training complete instead of repeating the last steps.
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    if trainer.global_step < loop.steps:
        raise StageError(f"{stage}: training stopped at step {trainer.global_step} of {loop.steps}; "
                         f"re-run to resume from {ckpt_dir / 'last.ckpt'}")
    resumed_from = start_step.step if start_step.step is not None else trainer.global_step
    return FitResult(trainer, seconds, resumed_from)

