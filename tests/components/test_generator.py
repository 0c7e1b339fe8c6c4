"""Stages `base` and `superres`: training from precomputed data, export, resume, NaN stop, evaluation."""

import json
import signal
from dataclasses import replace

import pytest
import torch

from components import base, generator, superres
from components.errors import BadInputError, StageError
from models.masked_transformer import load_generator
from tests.conftest import REPO, sigkill_after_checkpoint


def test_both_generators_are_exported_with_their_tokenizer_contracts(smoke_cascade):
    art = smoke_cascade.art
    b, s = load_generator(smoke_cascade.base), load_generator(smoke_cascade.superres)
    assert b.spec.codebook_size == art.cfg.tokenizer.base.codebook_size and not b.spec.is_superres
    assert b.spec.grid == art.cfg.tokenizer.base.resolution // art.cfg.tokenizer.base.downsample
    assert s.spec.codebook_size == art.cfg.tokenizer.superres.codebook_size
    assert (s.spec.cond_codebook_size, s.spec.cond_grid) == (b.spec.codebook_size, b.spec.grid)
    assert s.spec.cond_add == art.cfg.superres.model.cond_add and not b.spec.cond_add
    meta = json.loads((smoke_cascade.base / "generator.json").read_text())
    assert meta["sample"]["steps"] == art.cfg.base.sample.steps and meta["text_encoder"]["fingerprint"]
    assert not list(smoke_cascade.base.glob("*.ckpt"))  # checkpoints stay out of the outputs


@pytest.mark.parametrize("which", ["base", "superres"])
def test_held_out_prompts_are_checked_at_default_guidance_and_without(smoke_cascade, which):
    metrics = smoke_cascade.base_metrics if which == "base" else smoke_cascade.superres_metrics
    out = getattr(smoke_cascade, which)
    for suffix in ("", "_g0"):
        for category in ("colour", "shape", "count", "overall", "single_colour_shape", "pair_overall"):
            assert 0 <= metrics[f"checker_{category}{suffix}"] <= 1
    assert metrics["final_loss"] > 0 and metrics["tokens_per_second"] > 0
    table = (out / "checker.md").read_text()
    assert "| guidance |" in table and "| 0 |" in table
    # smoke checks two seed sets at the default guidance: set 0 is the fixed-seed figure above
    sets = getattr(smoke_cascade.art.cfg, which).eval_seed_sets
    assert sets == 2 and "| mean of 2 |" in table
    for headline in ("single_colour_shape", "pair_overall"):
        per_set = [metrics[f"checker_{headline}_set{j}"] for j in range(sets)]
        assert per_set[0] == metrics[f"checker_{headline}"]
        assert metrics[f"checker_{headline}_mean"] == pytest.approx(sum(per_set) / sets)
    assert (out / "samples.png").stat().st_size > 0 and "0: " in (out / "samples.txt").read_text()


def test_masks_follow_the_schedule_and_text_is_dropped_for_a_tenth():
    g = torch.Generator().manual_seed(0)
    masked, dropped = generator.draw_masks(g, 20_000, 64, 0.1)
    assert dropped.float().mean() == pytest.approx(0.1, abs=0.01)
    assert (masked.sum(1) >= 1).all()
    assert masked.float().mean() == pytest.approx(2 / torch.pi, abs=0.01)  # E[ceil(rN)]/N ~ mean rate 0.64


def test_random_streams_differ_by_rank_and_step_but_repeat_for_the_same_ones():
    seeds = {(rank, step): generator.hash_seed(0, rank, step) for rank in range(2) for step in range(3)}
    assert len(set(seeds.values())) == 6
    assert generator.hash_seed(0, 1, 2) == seeds[(1, 2)]


# Lightning's "dataloader is not resumable" warning is silenced: fit draws batches with replacement
@pytest.mark.filterwarnings("error:.*resuming from a checkpoint")
def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(smoke_cascade, tmp_path):
    art = smoke_cascade.art
    script = tmp_path / "train.py"
    script.write_text(f"""
import sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
import torch
torch.set_num_threads(1)
from components.config import load_config
from components import generator
cfg = load_config({str(REPO / 'params.yaml')!r}, "smoke").base
cfg = replace(cfg, train=replace(cfg.train, steps=400, checkpoint_every=10))
generator.train(cfg, "base", Path({str(smoke_cascade.tokens)!r}), Path({str(art.features)!r}),
                Path({str(tmp_path / 'out')!r}), Path({str(tmp_path / 'ckpt')!r}))
""")
    last = tmp_path / "ckpt" / "last.ckpt"
    code = sigkill_after_checkpoint(script, last)
    assert code == -signal.SIGKILL and last.exists(), "the run finished before it could be killed"
    assert not (tmp_path / "out" / "generator.safetensors").exists()
    saved = torch.load(last, map_location="cpu", weights_only=False)  # our own checkpoint, from this test
    killed_at = saved["global_step"]
    assert 10 <= killed_at < 400 and saved["optimizer_states"]

    cfg = replace(art.cfg.base, train=replace(art.cfg.base.train, steps=400, checkpoint_every=10))
    trained = generator.train(cfg, "base", smoke_cascade.tokens, art.features, tmp_path / "out", tmp_path / "ckpt")
    assert trained.metrics["resumed_from_step"] >= killed_at > 0
    assert (tmp_path / "out" / "generator.safetensors").exists()


def test_a_non_finite_loss_stops_training_keeps_the_checkpoint_and_exports_nothing(smoke_cascade, tmp_path, monkeypatch):
    import models.masked_transformer as mt

    art = smoke_cascade.art
    cfg = replace(art.cfg.base, train=replace(art.cfg.base.train, steps=12, checkpoint_every=4))
    real_loss, calls = mt.masked_token_loss, []

    def poisoned(logits, targets, masked):
        calls.append(1)
        loss = real_loss(logits, targets, masked)
        return loss * float("nan") if len(calls) > 6 else loss

    monkeypatch.setattr(mt, "masked_token_loss", poisoned)
    with pytest.raises(StageError, match=r"base: loss became nan at step 6; training stopped, the last good checkpoint"):
        generator.train(cfg, "base", smoke_cascade.tokens, art.features, tmp_path / "out", tmp_path / "ckpt")
    assert not (tmp_path / "out" / "generator.safetensors").exists()
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4  # the last good one
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_ema_weights_are_what_gets_exported(smoke_cascade, tmp_path):
    art = smoke_cascade.art
    plain = replace(art.cfg.base, train=replace(art.cfg.base.train, steps=6, checkpoint_every=100))
    ema = replace(plain, train=replace(plain.train, ema_decay=0.5))
    a = generator.train(plain, "base", smoke_cascade.tokens, art.features, tmp_path / "a", tmp_path / "ca").model
    b = generator.train(ema, "base", smoke_cascade.tokens, art.features, tmp_path / "b", tmp_path / "cb").model
    diffs = [float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters())]
    assert max(diffs) > 0  # same seed and data: only the averaging differs
    assert torch.equal(load_generator(tmp_path / "b").head.weight, b.head.weight)


def test_kl_latents_or_missing_tokens_give_one_line_errors(smoke_cascade, tmp_path):
    art = smoke_cascade.art
    with pytest.raises(BadInputError, match="no precomputed tokens here; run the tokens stage first"):
        generator.train(art.cfg.base, "base", tmp_path / "nowhere", art.features, tmp_path / "o", tmp_path / "c")
    with_map = replace(art.cfg.base, model=replace(art.cfg.base.model, cond_add=True))
    with pytest.raises(BadInputError, match="base.model.cond_add false"):
        generator.train(with_map, "base", smoke_cascade.tokens, art.features, tmp_path / "o", tmp_path / "c")
    big = replace(art.cfg.base, train=replace(art.cfg.base.train, batch_size=10_000))
    with pytest.raises(BadInputError, match="batch_size 10000 exceeds the"):
        generator.train(big, "base", smoke_cascade.tokens, art.features, tmp_path / "o", tmp_path / "c")


def test_the_cascade_loads_for_inference_and_refuses_another_text_encoder(smoke_cascade, tmp_path):
    art = smoke_cascade.art
    cascade = superres.load_for_inference(art.cfg, smoke_cascade.base, smoke_cascade.superres, art.tokenizer)
    images = cascade.generate(["a small red circle", "two large blue squares"], seed=1)
    assert images.shape == (2, 3, art.cfg.tokenizer.superres.resolution, art.cfg.tokenizer.superres.resolution)
    assert torch.equal(images, cascade.generate(["a small red circle", "two large blue squares"], seed=1))
    other = replace(art.cfg, features=replace(art.cfg.features, encoder=replace(art.cfg.features.encoder, max_length=7)))
    with pytest.raises(BadInputError, match="features.encoder must match the training run"):
        superres.load_for_inference(other, smoke_cascade.base, smoke_cascade.superres, art.tokenizer)
    with pytest.raises(BadInputError, match="missing; train the cascade first"):
        superres.load_for_inference(art.cfg, tmp_path / "none", smoke_cascade.superres, art.tokenizer)


def test_base_stage_is_tracked_in_mlflow(smoke_cascade, tmp_path, mlflow_uri):
    import mlflow

    art = smoke_cascade.art
    result = base.execute(art.cfg, smoke_cascade.tokens, art.features, art.tokenizer, art.validate,
                          tmp_path / "base", tmp_path / "ckpt", tmp_path / "metrics.json")
    run = mlflow.search_runs(experiment_names=[art.cfg.tracking.experiment], output_format="list")[0]
    assert run.data.metrics["checker_overall"] == pytest.approx(result.metrics["checker_overall"])
    assert "train/loss" in run.data.metrics  # Lightning's curve, in the stage's own run
    assert json.loads((tmp_path / "metrics.json").read_text())["final_loss"] > 0
