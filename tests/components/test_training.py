"""components.training: checkpoint fingerprints, code digests."""

import types

import pytest

from components.errors import StageError
from components.training import code_digest, fingerprint, per_process_batch, prepare_checkpoints, process_grid


def test_checkpoints_of_another_fingerprint_are_wiped_and_the_same_one_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert prepare_checkpoints(ckpt, "a") is None
    (ckpt / "last.ckpt").write_bytes(b"state")
    assert prepare_checkpoints(ckpt, "a") == ckpt / "last.ckpt"  # same run: resume
    assert prepare_checkpoints(ckpt, "b") is None and not (ckpt / "last.ckpt").exists()  # another: afresh


def test_changed_training_code_changes_the_fingerprint(tmp_path):
    source = tmp_path / "train_code.py"
    module = types.SimpleNamespace(__file__=str(source))
    source.write_text("LOSS = 'l2'\n")
    before = fingerprint(spec={"w": 1}, code=code_digest(module))
    assert fingerprint(spec={"w": 1}, code=code_digest(module)) == before
    source.write_text("LOSS = 'l1'\n")
    assert fingerprint(spec={"w": 1}, code=code_digest(module)) != before


def test_non_zero_ranks_only_read_the_checkpoint_folder(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    prepare_checkpoints(ckpt, "a")
    (ckpt / "last.ckpt").write_bytes(b"state")
    monkeypatch.setenv("RANK", "1")
    assert prepare_checkpoints(ckpt, "a") == ckpt / "last.ckpt"
    assert prepare_checkpoints(ckpt, "b") is None and (ckpt / "last.ckpt").exists()  # rank 0 decides to wipe


def test_the_process_grid_comes_from_torchrun_when_it_launched_us(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert process_grid(8) == (8, 1)  # params: one node, train.devices
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert process_grid(8) == (8, 4)  # a 4-node TrainJob
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")
    with pytest.raises(StageError, match="not a multiple"):
        process_grid(8)


def test_the_batch_size_is_global_and_split_evenly_over_processes():
    assert per_process_batch("base", 512, 1) == 512
    assert per_process_batch("base", 512, 32) == 16
    with pytest.raises(StageError, match="base.train.batch_size 512 is the global batch.*over 24 processes"):
        per_process_batch("base", 512, 24)


@pytest.mark.gpu
def test_fit_trains_on_the_gpu_in_bf16_mixed_with_fp32_weights_and_resumes(tmp_path):
    """precision 'auto' on a GPU machine: Lightning's bf16-mixed, fp32 master weights, a falling
    loss on a fixed batch, and a resumed run that continues from the saved step."""
    from dataclasses import asdict, replace

    import torch
    from lightning.pytorch.callbacks import Callback

    from components.config import GeneratorTrainConfig
    from components.generator import BatchDataset, _lightning_module, whole_batch
    from components.training import fit
    from models.masked_transformer import MaskedTransformerSpec, masked_token_loss

    spec = MaskedTransformerSpec(codebook_size=16, grid=4, text_dim=8, text_length=4, width=32, depth=1, heads=4)
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, 16, (8, spec.n_tokens), generator=g),
             "text": torch.randn(8, spec.text_length, spec.text_dim, generator=g),
             "text_mask": torch.ones(8, spec.text_length, dtype=torch.bool)}

    class FixedBatch(BatchDataset):  # every draw is the same 8 examples: the loss must fall
        def __len__(self) -> int:
            return 8

        def __getitems__(self, indices: list[int]) -> dict:
            return {k: v[: len(indices)] for k, v in batch.items()}

    loop = GeneratorTrainConfig(steps=40, batch_size=8, lr=3e-3, betas=(0.9, 0.99), warmup_steps=2,
                                checkpoint_every=10, seed=0, precision="auto", devices=1, num_workers=0,
                                weight_decay=0.0, grad_clip=1.0, text_dropout=0.0, ema_decay=0.0)
    module = _lightning_module()(spec.to_dict(), asdict(loop), "base")
    masked = torch.rand(batch["tokens"].shape, generator=g) < 0.5

    def fixed_loss() -> float:
        device = next(module.parameters()).device
        with torch.no_grad():
            logits = module.model(batch["tokens"].masked_fill(masked, spec.mask_id).to(device),
                                  batch["text"].to(device), batch["text_mask"].to(device))
        return masked_token_loss(logits.float().cpu(), batch["tokens"], masked).item()

    class WhereWeightsLive(Callback):  # Lightning moves the module back to the CPU once fit ends
        def __init__(self) -> None:
            self.seen: set = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            weight = next(pl_module.parameters())
            self.seen.add((weight.device.type, weight.dtype))

    before = fixed_loss()
    where = WhereWeightsLive()
    result = fit("base", module, FixedBatch(), loop, ckpt_dir=tmp_path / "ckpt", run_fingerprint="gpu",
                 collate_fn=whole_batch, callbacks=[where])
    assert result.trainer.precision == "bf16-mixed" and result.trainer.global_step == 40
    assert where.seen == {("cuda", torch.float32)}
    assert fixed_loss() < before - 0.25  # fp32 on CPU: 2.81 -> 2.25 nats in these 40 steps

    longer = replace(loop, steps=50)
    resumed = fit("base", _lightning_module()(spec.to_dict(), asdict(longer), "base"), FixedBatch(), longer,
                  ckpt_dir=tmp_path / "ckpt", run_fingerprint="gpu", collate_fn=whole_batch)
    assert resumed.resumed_from == 40 and resumed.trainer.global_step == 50


def test_fit_redraws_the_progress_bar_about_500_times_a_run_under_the_stage_name(tmp_path, caplog):
    """Redrawing every step cost 2% of a CPU tokenizer step (bench_tokenizer): 1000 steps redraw every 2."""
    import lightning as L
    import torch

    from components.training import fit

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loop = types.SimpleNamespace(steps=1000, batch_size=1, devices=1, num_workers=0, checkpoint_every=1000,
                                 precision="32-true")
    result = fit("tiny", Tiny(), torch.zeros(4, 2), loop, ckpt_dir=tmp_path / "ckpt", run_fingerprint="t")
    assert result.trainer.global_step == 1000
    assert result.trainer.progress_bar_callback.refresh_rate == 2
    assert result.trainer.progress_bar_callback._get_train_description(0) == "tiny: steps"  # not "Epoch 0/-2"
    assert "weights_only" not in caplog.text  # Lightning's note at each checkpoint save is silenced
