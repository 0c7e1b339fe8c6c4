"""Stage `tokenizer`: training, export, metrics, and resume after SIGKILL."""

import json
import signal
from dataclasses import replace

import pytest
import torch

from components import tokenizer
from components.images import ShardImageDataset
from models.tokenizer import load_tokenizer
from tests.conftest import REPO, sigkill_after_checkpoint


def test_both_tokenizers_are_exported_loadable_without_lightning_with_metrics(smoke_artifacts):
    art = smoke_artifacts
    for which in tokenizer.WHICH:
        model = load_tokenizer(art.tokenizer / which)
        spec = getattr(art.cfg.tokenizer, which)
        assert model.spec.resolution == spec.resolution and model.codebook_size == spec.codebook_size
        metrics = json.loads((art.tokenizer / which / "metrics.json").read_text())
        assert {"psnr", "l1", "codebook_usage", "perplexity", "checker_overall"} <= set(metrics)
        assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1
        assert (art.tokenizer / which / "recon_grid.png").stat().st_size > 0
        assert not (art.tokenizer / which / "last.ckpt").exists()  # checkpoints stay out of the outputs


def test_exported_tokenizer_reproduces_its_reported_psnr(smoke_artifacts):
    from models.losses import psnr

    art = smoke_artifacts
    model = load_tokenizer(art.tokenizer / "base")
    accepted = tokenizer.read_accepted(art.validate)
    val = ShardImageDataset(art.data, accepted[accepted["split"] == "val"].head(art.cfg.tokenizer.eval_images),
                            model.spec.resolution)
    x = torch.stack([val[i] for i in range(len(val))])
    with torch.inference_mode():
        value = float(psnr(model(x).recon.clamp(-1, 1), x))
    reported = json.loads((art.tokenizer / "base" / "metrics.json").read_text())["psnr"]
    assert value == pytest.approx(reported, abs=1e-3)


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(smoke_artifacts, tmp_path):
    art = smoke_artifacts
    script = tmp_path / "train.py"
    script.write_text(f"""
import sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from components.config import load_config
from components import tokenizer
cfg = load_config({str(REPO / 'params.yaml')!r}, "smoke").tokenizer
cfg = replace(cfg, train=replace(cfg.train, steps=400, checkpoint_every=10, disc_start=1000))
tokenizer.train_one(cfg, "base", Path({str(art.data)!r}), tokenizer.read_accepted(Path({str(art.validate)!r})),
                    Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'ckpt')!r}))
""")
    last = tmp_path / "ckpt" / "last.ckpt"
    code = sigkill_after_checkpoint(script, last)
    assert code == -signal.SIGKILL and last.exists(), "the run finished before it could be killed"
    assert not (tmp_path / "out" / "base" / "tokenizer.safetensors").exists()
    saved = torch.load(last, map_location="cpu", weights_only=False)  # our own checkpoint, from this test
    killed_at = saved["global_step"]
    assert 10 <= killed_at < 400 and saved["optimizer_states"] and "code_usage" in "".join(saved["state_dict"])

    cfg = art.cfg.tokenizer
    cfg = replace(cfg, train=replace(cfg.train, steps=400, checkpoint_every=10, disc_start=1000))
    metrics = tokenizer.train_one(cfg, "base", art.data, tokenizer.read_accepted(art.validate),
                                  tmp_path / "out", tmp_path / "ckpt")
    assert metrics["resumed_from_step"] >= killed_at > 0  # continued, not restarted
    assert (tmp_path / "out" / "base" / "tokenizer.safetensors").exists()


def test_a_finished_run_is_not_repeated_and_a_changed_config_starts_afresh(smoke_artifacts, tmp_path):
    art = smoke_artifacts
    cfg = art.cfg.tokenizer
    short = replace(cfg, train=replace(cfg.train, steps=10, checkpoint_every=5))
    accepted = tokenizer.read_accepted(art.validate)
    tokenizer.train_one(short, "base", art.data, accepted, tmp_path / "out", tmp_path / "ckpt")
    again = tokenizer.train_one(short, "base", art.data, accepted, tmp_path / "out", tmp_path / "ckpt")
    assert again["resumed_from_step"] == 10  # finished: the final state was checkpointed, nothing re-trained
    changed = replace(short, train=replace(short.train, lr=short.train.lr / 2, steps=12))
    metrics = tokenizer.train_one(changed, "base", art.data, accepted, tmp_path / "out", tmp_path / "ckpt")
    assert metrics["resumed_from_step"] == 0


def test_a_tokenizers_own_step_budget_replaces_the_shared_one(smoke_artifacts, tmp_path):
    art = smoke_artifacts
    cfg = art.cfg.tokenizer
    cfg = replace(cfg, train=replace(cfg.train, steps=4, checkpoint_every=2), base=replace(cfg.base, train_steps=6))
    assert cfg.train_for("superres").steps == 4
    tokenizer.train_one(cfg, "base", art.data, tokenizer.read_accepted(art.validate), tmp_path / "out",
                        tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)  # ours
    assert saved["global_step"] == 6


def test_training_batches_go_through_the_configured_augmentation(smoke_artifacts, tmp_path, monkeypatch):
    from models.tokenizer import ImageTokenizer

    art = smoke_artifacts
    ops_seen, loaded, tokenizer_inputs = [], [], []
    load, forward = tokenizer.ShardImageDataset.__getitem__, ImageTokenizer.forward

    def recording_augment(images, ops):
        ops_seen.append(tuple(ops))
        return images.flip(1)  # a change the tokenizer must receive

    def recording_load(self, index):
        loaded.append(load(self, index))
        return loaded[-1]

    def recording_forward(self, images):
        tokenizer_inputs.append(images.clone())
        return forward(self, images)

    monkeypatch.setattr(tokenizer, "augment", recording_augment)
    monkeypatch.setattr(tokenizer.ShardImageDataset, "__getitem__", recording_load)
    monkeypatch.setattr(ImageTokenizer, "forward", recording_forward)
    cfg = art.cfg.tokenizer
    for ops, steps in ((("channel_permute",), 3), ((), 2)):
        ops_seen.clear(), loaded.clear(), tokenizer_inputs.clear()
        run_cfg = replace(cfg, base=replace(cfg.base, train_steps=None, augment=None),
                          train=replace(cfg.train, steps=steps, checkpoint_every=steps, augment=ops))
        tokenizer.train_one(run_cfg, "base", art.data, tokenizer.read_accepted(art.validate),
                            tmp_path / f"out{steps}", tmp_path / f"ckpt{steps}")
        assert ops_seen == [ops] * (steps if ops else 0)
        first_batch = torch.stack(loaded[:run_cfg.train.batch_size])
        assert torch.equal(tokenizer_inputs[0], first_batch.flip(1) if ops else first_batch)


def test_missing_accepted_manifest_says_what_to_run(tmp_path, smoke_artifacts):
    from components.errors import BadInputError

    with pytest.raises(BadInputError, match="run the validate stage first"):
        tokenizer.run(smoke_artifacts.cfg.tokenizer, tmp_path, tmp_path, tmp_path / "o", tmp_path / "c")


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth():
    from components.training import lr_factor

    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_factor(100, 10, 100) == pytest.approx(0.1) and lr_factor(500, 10, 100) == pytest.approx(0.1)


def test_discriminator_depth_fits_the_resolution():
    from components.tokenizer import _disc_layers

    assert [_disc_layers(r) for r in (8, 16, 32, 256)] == [1, 2, 3, 3]
