"""The diffusion family through the base and superres stages (components/diffusion.py), its config
rules, and evaluate/register on it."""

import json

import pytest
import torch

from components.config import ConfigError, load_config
from components.errors import BadInputError
from tests.conftest import DIFFUSION, REPO


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"generator.family": "diffusion"}, "tokenizer.kind: the diffusion family trains on KL-VAE latents"),
    ({"tokenizer.kind": "kl"}, "tokenizer.kind: the masked family trains on VQGAN tokens"),
    ({**DIFFUSION, "diffusion.base.sample.thresholding": "dynamic"}, "diffusion.base.sample.thresholding"),
    ({**DIFFUSION, "diffusion.superres.noise_aug.sample": 1.5}, "diffusion.superres.noise_aug"),
    ({**DIFFUSION, "diffusion.base.phases": []}, "at least one phase"),
    ({**DIFFUSION, "diffusion.base.phases": [
        {"name": "a", "steps": 1, "lr": 0.1, "warmup_steps": 0, "text": True, "min_caption_words": 0},
        {"name": "a", "steps": 1, "lr": 0.1, "warmup_steps": 0, "text": True, "min_caption_words": 0}]},
     r"phases\[1\].name"),
    ({**DIFFUSION, "diffusion.base.phases": [
        {"name": "a", "steps": 1, "lr": 0.1, "warmup_steps": 0, "text": False, "min_caption_words": 0}]},
     "must be text-conditioned"),
    ({"inference.candidates": 0}, "inference.candidates"),
])
def test_family_rules_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "params.yaml", "smoke", overrides)


def test_every_profile_loads_with_the_diffusion_family():
    xgen = {"tokenizer.base.resolution": 64, "tokenizer.base.downsample": 8, "tokenizer.base.latent_channels": 4,
            "tokenizer.base.channels": [128, 256, 256, 512]}  # base256: 64 px latents upsampled to 256 px
    for profile, extra in (("smoke", {}), ("tiny", {}), ("base256", xgen)):
        cfg = load_config(REPO / "params.yaml", profile, {**DIFFUSION, **extra})
        assert cfg.generator.family == "diffusion" and [p.name for p in cfg.diffusion.base.phases] == \
            ["pixel", "align", "finetune"]
    with pytest.raises(ConfigError, match="tokenizer.base.resolution: the diffusion family's super-res model upsamples"):
        load_config(REPO / "params.yaml", "base256", DIFFUSION)


def test_placement_checks_the_diffusion_sections_devices():
    from pipelines.placement import check_placement

    cfg = load_config(REPO / "params.yaml", "tiny", {**DIFFUSION, "diffusion.superres.train.devices": 2})
    with pytest.raises(ConfigError, match=r"diffusion.superres.train.devices \(2\)"):
        check_placement(cfg)


# --- base: PixArt phases ----------------------------------------------------------------------

def test_base_trains_every_phase_and_exports_the_last(smoke_diffusion):
    from models.diffusion import read_diffusion_meta

    base, m = smoke_diffusion.base, smoke_diffusion.base_metrics
    for phase in ("pixel", "align", "finetune"):
        assert read_diffusion_meta(base / "phases" / phase)["phase"] == phase
    assert read_diffusion_meta(base)["phase"] == "finetune"
    assert (base / "diffusion.safetensors").read_bytes() == (base / "phases" / "finetune" / "diffusion.safetensors").read_bytes()
    # each phase has its own data: finetune keeps the densest captions only
    assert m["finetune.items"] < m["align.items"] == m["pixel.items"]
    assert "checker_single_colour_shape" in m and (base / "checker.md").is_file()


class Recorder:
    """A Lightning callback keeping the first weights and every step's dropped-text mask."""

    def __init__(self):
        import lightning as L

        outer = self

        class _CB(L.Callback):
            def on_train_start(self, trainer, module):
                outer.first = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

            def on_train_batch_end(self, trainer, module, *args):
                outer.dropped.append(module.last_dropped.clone())
                if module.last_aug_steps is not None:
                    outer.aug.append(module.last_aug_steps.clone())

        self.callback, self.first, self.dropped, self.aug = _CB(), None, [], []


def test_a_phase_starts_from_the_previous_phase_and_pixel_phase_has_no_text(smoke_diffusion, tmp_path):
    from components import diffusion
    from models.diffusion import load_diffusion

    d, art = smoke_diffusion, smoke_diffusion.art
    rec = Recorder()
    diffusion.run_base(d.cfg, d.tokens, art.features, d.tokenizer, art.validate, tmp_path / "base", tmp_path / "ckpt",
                       phases=("align",), init_dir=d.base / "phases" / "pixel", callbacks=[rec.callback])
    pixel = load_diffusion(d.base / "phases" / "pixel").state_dict()
    assert all(torch.equal(rec.first[k], pixel[k]) for k in pixel)
    assert not (tmp_path / "base" / "checker.md").exists()  # only the finished (last) phase is checked
    rec = Recorder()
    diffusion.run_base(d.cfg, d.tokens, art.features, d.tokenizer, art.validate, tmp_path / "base2",
                       tmp_path / "ckpt2", phases=("pixel",), callbacks=[rec.callback])
    assert all(bool(step.all()) for step in rec.dropped)  # unconditional: every example has the null text


def test_phase_errors(smoke_diffusion, tmp_path):
    from components import diffusion

    d, art = smoke_diffusion, smoke_diffusion.art
    args = (d.cfg, d.tokens, art.features, d.tokenizer, art.validate, tmp_path / "b", tmp_path / "c")
    with pytest.raises(BadInputError, match="unknown phase 'nope'"):
        diffusion.run_base(*args, phases=("nope",))
    with pytest.raises(BadInputError, match="starts from phase 'pixel'"):
        diffusion.run_base(*args, phases=("align",))
    with pytest.raises(BadInputError, match="cannot start from the previous phase"):
        diffusion.run_base(*args, phases=("align",), init_dir=tmp_path / "missing")


def test_masked_tokens_are_refused(smoke_cascade, smoke_diffusion, tmp_path):
    from components import diffusion

    d, art = smoke_diffusion, smoke_diffusion.art
    with pytest.raises(BadInputError, match="needs KL latents"):
        diffusion.run_base(d.cfg, smoke_cascade.tokens, art.features, d.tokenizer, art.validate, tmp_path / "b",
                           tmp_path / "c")


def test_phases_are_nested_mlflow_runs(smoke_diffusion, tmp_path, mlflow_uri):
    import mlflow

    from components import base

    d, art = smoke_diffusion, smoke_diffusion.art
    base.execute(d.cfg, d.tokens, art.features, d.tokenizer, art.validate, tmp_path / "base", tmp_path / "ckpt",
                 tmp_path / "base.json")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    stage = by_name["base"]
    assert stage.data.params["generator.family"] == "diffusion" and "diffusion.base.backbone" in stage.data.params
    for phase in ("pixel", "align", "finetune"):
        run = by_name[phase]
        assert run.data.tags["mlflow.parentRunId"] == stage.info.run_id
        assert run.data.params["phase.name"] == phase and "train/loss" in run.data.metrics
    one = base.execute(d.cfg, d.tokens, art.features, d.tokenizer, art.validate, tmp_path / "one", tmp_path / "ckpt",
                       tmp_path / "one.json", phase="pixel")
    assert "pixel.train_seconds" in one.metrics
    names = [r.info.run_name for r in mlflow.search_runs(search_all_experiments=True, output_format="list")]
    assert "base/pixel" in names  # a KFP phase task is its own stage run


# --- superres: Imagen pixel SR ------------------------------------------------------------------

def test_superres_trains_with_noise_augmentation_and_checks_the_cascade(smoke_diffusion, tmp_path):
    from components import diffusion
    from models.diffusion import augmentation_step, read_diffusion_meta

    d, art = smoke_diffusion, smoke_diffusion.art
    meta = read_diffusion_meta(d.superres)
    assert meta["spec"]["low_res"] == d.cfg.tokenizer.base.resolution
    assert meta["spec"]["size"] == d.cfg.tokenizer.superres.resolution
    assert "checker_single_colour_shape" in d.superres_metrics
    rec = Recorder()
    diffusion.run_superres(d.cfg, art.data, art.validate, art.features, d.tokenizer, d.base, tmp_path / "sr",
                           tmp_path / "ckpt", callbacks=[rec.callback])
    levels = torch.cat(rec.aug)
    features = diffusion.FeatureStore.open(art.features)
    top = augmentation_step(diffusion.superres_spec(d.cfg, features.dim, features.max_length),
                            d.cfg.diffusion.superres.noise_aug.train_max)
    assert int(levels.max()) <= top and len(set(levels.tolist())) > 5


def test_cascade_loads_for_inference_and_generates(smoke_diffusion):
    from components.cascades import load_from_dirs

    d = smoke_diffusion
    cascade = load_from_dirs(d.cfg, d.base, d.superres, d.tokenizer)
    images = cascade.generate(["a red circle", "two blue squares"], seed=3)
    assert images.shape == (2, 3, cascade.resolution, cascade.resolution) and images.abs().max() <= 1
    assert torch.equal(images, cascade.generate(["a red circle", "two blue squares"], seed=3))
    edited = cascade.img2img(["a green triangle"], images[:1], strength=0.5, seed=0)
    assert edited.shape == images[:1].shape


# --- evaluate and register --------------------------------------------------------------------

def test_evaluate_and_register_the_diffusion_cascade(smoke_diffusion, smoke_evaluator, tmp_path, mlflow_uri):
    from components import evaluate, register
    from components.bundle import load_bundle
    from models.diffusion_cascade import DiffusionCascade

    d, art = smoke_diffusion, smoke_diffusion.art
    result = evaluate.run(d.cfg, art.data, art.validate, art.features, d.tokenizer, d.base, d.superres, None,
                          smoke_evaluator, tmp_path / "evaluate")
    assert {"fid", "clip_score", "checker_single"} <= set(result.metrics)
    assert "generator family | diffusion" in (tmp_path / "evaluate" / "report.md").read_text()
    reg = register.run(d.cfg, d.tokenizer, d.base, d.superres, None, tmp_path / "evaluate", tmp_path / "register",
                       data_digest="x", pipeline_run_id=None)
    bundle = tmp_path / "register" / "bundle"
    assert json.loads((bundle / "cascade.json").read_text())["family"] == "diffusion"
    assert sorted(p.name for p in bundle.iterdir() if p.is_dir()) == ["base", "superres", "vae"]
    cascade = load_bundle(bundle)
    assert isinstance(cascade, DiffusionCascade)
    assert cascade.generate(["a red circle"]).shape[-1] == d.cfg.tokenizer.superres.resolution
    assert reg.version == "1"
    import mlflow
    import pandas as pd

    served = mlflow.pyfunc.load_model(reg.model_uri).predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [1]}))
    assert len(served) == 1 and len(served["image"][0]) > 100  # a base64 PNG from the diffusion cascade


def test_the_unet_backbone_trains_through_the_same_stage(smoke_diffusion, tmp_path):
    from components import diffusion
    from models.diffusion import load_diffusion

    d, art = smoke_diffusion, smoke_diffusion.art
    cfg = load_config(REPO / "params.yaml", "smoke", {**DIFFUSION, "diffusion.base.backbone": "unet"})
    result = diffusion.run_base(cfg, d.tokens, art.features, d.tokenizer, art.validate, tmp_path / "base",
                                tmp_path / "ckpt", phases=("pixel",))
    model = load_diffusion(tmp_path / "base")
    assert type(model.net).__name__ == "UNet2DConditionModel" and result.metrics["pixel.final_loss"] > 0
