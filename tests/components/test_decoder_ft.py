"""Stage `decoder_ft`: a larger decoder on frozen codes (masked: the super-res VQGAN; diffusion: the
base KL-VAE on its latents); frozen parts checked; bad input."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from components import decoder_ft
from components.errors import BadInputError, StageError
from components.tokens import TokenStore
from models.tokenizer import ImageTokenizer, frozen_parameter_names, load_tokenizer, save_tokenizer, tokenizer_digest


class TinyFeatures(nn.Module):
    """A stand-in FID feature network: images [B,3,H,W] in [0,1] -> [B,8]."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(dim=(2, 3))


def with_min_psnr_gain(cfg, value):
    return dataclasses.replace(cfg, decoder_ft=dataclasses.replace(cfg.decoder_ft, min_psnr_gain=value))


def run_stage(trained, out, ckpt, min_psnr_gain=None, **kw):
    """decoder_ft.run on a trained smoke cascade of either family (smoke_cascade or smoke_diffusion);
    by default the new decoder ships whatever it measures (12 smoke steps may not beat the tokenizer's)."""
    art = trained.art
    args = dict(cfg=with_min_psnr_gain(trained.cfg, min_psnr_gain), data_dir=art.data, validate_dir=art.validate,
                tokens_dir=trained.tokens, tokenizer_dir=trained.tokenizer, base_dir=trained.base,
                superres_dir=trained.superres, out_dir=out, ckpt_dir=ckpt)
    return decoder_ft.run(**{**args, **kw})


@pytest.fixture(scope="module")
def finetuned(smoke_cascade, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_ft")
    digest = tokenizer_digest(smoke_cascade.art.tokenizer / "superres")
    result = run_stage(smoke_cascade, root / "out", root / "ckpt", feature_module=TinyFeatures())
    assert tokenizer_digest(smoke_cascade.art.tokenizer / "superres") == digest  # the source is untouched
    return result, root


def test_output_is_a_tokenizer_with_the_larger_decoder_and_the_same_codes(smoke_cascade, finetuned):
    result, _ = finetuned
    cfg = smoke_cascade.art.cfg.decoder_ft
    source = load_tokenizer(smoke_cascade.art.tokenizer / "superres")
    model = load_tokenizer(result.out_dir)
    assert model.spec == dataclasses.replace(source.spec, decoder_channels=tuple(cfg.channels),
                                             decoder_layers_per_block=cfg.layers_per_block)
    old, new = source.state_dict(), model.state_dict()
    for name in frozen_parameter_names(model):  # encoder, quant_conv, codebook
        assert torch.equal(old[name], new[name]), name
    assert not torch.equal(old["vq.post_quant_conv.weight"], new["vq.post_quant_conv.weight"])  # it trained
    store = TokenStore(smoke_cascade.tokens)
    codes = store.lookup("superres", store.keys["key"].tolist()[:4])  # what the super-res generator emits
    with torch.no_grad():
        images = model.decode(codes)
    r = source.spec.resolution
    assert images.shape == (4, 3, r, r) and torch.isfinite(images).all()


def test_metrics_report_and_grid(smoke_cascade, finetuned):
    result, _ = finetuned
    m = result.metrics
    for key in ("psnr_old", "psnr_new", "l1_old", "l1_new", "psnr_gain", "fid_old", "fid_new", "train_seconds",
                "decoder_parameters_old", "decoder_parameters_new", "final_loss"):
        assert key in m and math.isfinite(m[key]), key
    assert m["psnr_gain"] == pytest.approx(m["psnr_new"] - m["psnr_old"])
    assert m["decoder_parameters_new"] > m["decoder_parameters_old"]
    assert m["resumed_from_step"] == 0
    assert m["new_decoder_shipped"] == 1.0  # min_psnr_gain null: shipped whatever it measures
    assert json.loads((result.out_dir / "metrics.json").read_text()) == pytest.approx(m)
    report = (result.out_dir / "report.md").read_text()
    assert "| old |" in report and "| new |" in report and f"{m['psnr_new']:.2f}" in report
    n = min(8, smoke_cascade.art.cfg.decoder_ft.eval_images)
    r = smoke_cascade.art.cfg.tokenizer.superres.resolution
    grid = np.asarray(Image.open(result.out_dir / "comparison.png"))
    assert grid.shape == (3 * (r + 2), n * (r + 2), 3)  # rows: original | old decoder | new decoder


def test_rerun_resumes_the_finished_checkpoint(smoke_cascade, finetuned, tmp_path):
    result, root = finetuned
    again = run_stage(smoke_cascade, tmp_path / "out", root / "ckpt")
    assert again.metrics["resumed_from_step"] == smoke_cascade.art.cfg.decoder_ft.train.steps
    assert "fid_new" not in again.metrics  # no feature module, no FID
    assert again.metrics["psnr_new"] == pytest.approx(result.metrics["psnr_new"])


@pytest.mark.parametrize("gain, threshold, ships", [(0.5, 0.0, True), (0.0, 0.0, True), (-0.01, 0.0, False),
                                                     (-5.7, None, True), (1.0, 2.0, False), (-1.0, -2.0, True)])
def test_ships_new_decoder_only_at_or_above_min_psnr_gain(gain, threshold, ships):
    assert decoder_ft.ships_new_decoder({"psnr_gain": gain}, threshold) is ships


def test_a_decoder_below_min_psnr_gain_is_not_shipped(smoke_cascade, finetuned, tmp_path, caplog):
    """The same finished training, gated: out_dir carries the tokenizer's own decoder, and says why."""
    result, root = finetuned
    source_dir = smoke_cascade.art.tokenizer / "superres"
    with caplog.at_level("WARNING", logger="components.decoder_ft"):
        kept = run_stage(smoke_cascade, tmp_path / "out", root / "ckpt", min_psnr_gain=1000.0)
    assert kept.metrics["resumed_from_step"] == smoke_cascade.art.cfg.decoder_ft.train.steps  # gating is not training
    assert kept.metrics["psnr_new"] == pytest.approx(result.metrics["psnr_new"])
    assert kept.metrics["new_decoder_shipped"] == 0.0
    shipped, source = load_tokenizer(kept.out_dir), load_tokenizer(source_dir)
    assert shipped.spec == source.spec
    for name, tensor in source.state_dict().items():
        assert torch.equal(shipped.state_dict()[name], tensor), name
    report = (kept.out_dir / "report.md").read_text()
    assert "Shipped: the tokenizer's **old** decoder" in report and "min_psnr_gain 1000" in report
    assert f"{kept.metrics['psnr_new']:.2f}" in report  # the new decoder's figures are still reported
    gain = f"{kept.metrics['psnr_gain']:+.2f} dB"
    assert any(f"PSNR gain over the tokenizer's own is {gain}" in r.getMessage()
               and "below decoder_ft.min_psnr_gain 1000" in r.getMessage() for r in caplog.records)

    loose = run_stage(smoke_cascade, tmp_path / "loose", root / "ckpt", min_psnr_gain=-1000.0)
    assert loose.metrics["new_decoder_shipped"] == 1.0
    assert load_tokenizer(loose.out_dir).spec == load_tokenizer(result.out_dir).spec != source.spec
    assert "Shipped: the **new** decoder (PSNR gain at least decoder_ft.min_psnr_gain -1000 dB)" in \
        (loose.out_dir / "report.md").read_text()


def _copy_generators(cascade, tmp_path):
    base, superres = tmp_path / "base", tmp_path / "superres"
    shutil.copytree(cascade.base, base)
    shutil.copytree(cascade.superres, superres)
    return base, superres


@pytest.mark.parametrize("what", ["codebook", "encoder", "generator"])
def test_a_frozen_part_changed_during_training_fails(smoke_cascade, tmp_path, what):
    from lightning.pytorch.callbacks import Callback

    base, superres = _copy_generators(smoke_cascade, tmp_path)

    class Tamper(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx != 1:
                return
            tok = pl_module.tokenizer
            with torch.no_grad():
                if what == "codebook":
                    tok.codebook.add_(0.01)
                elif what == "encoder":
                    tok.vq.encoder.conv_in.weight.mul_(1.01)
            if what == "generator":
                with (base / "generator.safetensors").open("ab") as f:
                    f.write(b"\0")

    match = "base generator" if what == "generator" else "encoder, quant_conv and codebook"
    with pytest.raises(StageError, match=f"decoder_ft: frozen {match}.* changed") as e:
        run_stage(smoke_cascade, tmp_path / "out", tmp_path / "ckpt", base_dir=base, superres_dir=superres,
                  callbacks=[Tamper()])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "tokenizer.safetensors").exists()
    assert not (tmp_path / "ckpt").exists()  # tainted checkpoints are not resumed


def test_kl_tokenizer_is_refused(smoke_cascade, tmp_path):
    spec = load_tokenizer(smoke_cascade.art.tokenizer / "superres").spec
    kl = dataclasses.replace(spec, kind="kl", codebook_size=0)
    save_tokenizer(ImageTokenizer(kl), tmp_path / "tokenizer" / "superres")
    with pytest.raises(BadInputError, match="kl tokenizer; decoder finetuning .* VQGAN"):
        run_stage(smoke_cascade, tmp_path / "out", tmp_path / "ckpt", tokenizer_dir=tmp_path / "tokenizer")


def _with_decoder(cfg, **change):
    return dataclasses.replace(cfg, decoder_ft=dataclasses.replace(cfg.decoder_ft, **change))


@pytest.mark.parametrize("change, match", [
    (dict(channels=(16, 32)), r"decoder_ft.channels \[16, 32\] needs 3 entries"),
    (dict(channels=(8, 32, 64)), "decoder_ft.channels / decoder_ft.layers_per_block: .*must not be smaller"),
])
def test_bad_decoder_params(smoke_cascade, tmp_path, change, match):
    cfg = _with_decoder(smoke_cascade.art.cfg, **change)
    with pytest.raises(BadInputError, match=match):
        run_stage(smoke_cascade, tmp_path / "out", tmp_path / "ckpt", cfg=cfg)


def test_missing_or_corrupt_inputs(smoke_cascade, tmp_path):
    with pytest.raises(BadInputError, match="keys.parquet: missing; run the tokens stage"):
        run_stage(smoke_cascade, tmp_path / "out", tmp_path / "ckpt", tokens_dir=tmp_path / "nowhere")
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(smoke_cascade.art.tokenizer, tokenizer)
    weights = tokenizer / "superres" / "tokenizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BadInputError, match="tokenizer.safetensors: corrupt or truncated"):
        run_stage(smoke_cascade, tmp_path / "out", tmp_path / "ckpt", tokenizer_dir=tokenizer)
    with pytest.raises(BadInputError, match="generator.json: missing"):
        run_stage(smoke_cascade, tmp_path / "out", tmp_path / "ckpt", superres_dir=tmp_path / "nowhere")


# --- the diffusion family: the base KL-VAE's decoder on the base latents ---------------------------

def _diffusion_digests(diffusion) -> dict:
    from models.diffusion import diffusion_digest

    return {"vae": tokenizer_digest(diffusion.tokenizer / "base"), "base": diffusion_digest(diffusion.base),
            "superres": diffusion_digest(diffusion.superres)}


@pytest.fixture(scope="module")
def finetuned_vae(smoke_diffusion, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_ft_diffusion")
    before = _diffusion_digests(smoke_diffusion)
    result = run_stage(smoke_diffusion, root / "out", root / "ckpt", feature_module=TinyFeatures())
    return result, before


def test_diffusion_family_finetunes_the_base_vae_decoder(smoke_diffusion, finetuned_vae):
    result, before = finetuned_vae
    cfg = smoke_diffusion.cfg.decoder_ft
    source = load_tokenizer(smoke_diffusion.tokenizer / "base")
    model = load_tokenizer(result.out_dir)
    assert source.spec.kind == model.spec.kind == "kl"
    assert model.spec == dataclasses.replace(source.spec, decoder_channels=tuple(cfg.channels),
                                             decoder_layers_per_block=cfg.layers_per_block)
    old, new = source.state_dict(), model.state_dict()
    frozen = frozen_parameter_names(model)
    assert frozen and all(n.startswith(("vae.encoder.", "vae.quant_conv.")) for n in frozen)
    assert any(n.startswith("vae.quant_conv.") for n in frozen)
    for name in frozen:
        assert torch.equal(old[name], new[name]), name
    assert not torch.equal(old["vae.post_quant_conv.weight"], new["vae.post_quant_conv.weight"])  # it trained
    assert sum(v.numel() for k, v in new.items() if k.startswith("vae.decoder.")) > \
        sum(v.numel() for k, v in old.items() if k.startswith("vae.decoder."))
    store = TokenStore(smoke_diffusion.tokens)
    latents = store.lookup("base", store.keys["key"].tolist()[:4])  # [4,C,g,g]: what the base model samples
    with torch.no_grad():
        images = model.decode(latents)
    r = smoke_diffusion.cfg.tokenizer.base.resolution
    assert images.shape == (4, 3, r, r) and torch.isfinite(images).all()
    assert _diffusion_digests(smoke_diffusion) == before  # the KL-VAE and both diffusion models untouched


def test_the_finetuned_vae_slots_into_the_diffusion_cascade(smoke_diffusion, finetuned_vae):
    from components.diffusion import load_cascade

    result, _ = finetuned_vae
    cascade = load_cascade(smoke_diffusion.cfg, smoke_diffusion.base, smoke_diffusion.tokenizer,
                           superres_dir=smoke_diffusion.superres, decoder_dir=result.out_dir)
    assert cascade.vae.spec == load_tokenizer(result.out_dir).spec  # latent contract checked by the cascade


def test_diffusion_family_metrics_and_report(smoke_diffusion, finetuned_vae):
    result, _ = finetuned_vae
    m = result.metrics
    for key in ("psnr_old", "psnr_new", "l1_old", "l1_new", "psnr_gain", "fid_old", "fid_new",
                "decoder_parameters_old", "decoder_parameters_new", "final_loss"):
        assert key in m and math.isfinite(m[key]), key
    assert m["decoder_parameters_new"] > m["decoder_parameters_old"]
    assert json.loads((result.out_dir / "metrics.json").read_text()) == pytest.approx(m)
    report = (result.out_dir / "report.md").read_text()
    assert report.startswith("# decoder_ft: old vs new base KL-VAE decoder")
    assert "same latents" in report and f"{m['psnr_new']:.2f}" in report
    n = min(8, smoke_diffusion.cfg.decoder_ft.eval_images)
    r = smoke_diffusion.cfg.tokenizer.base.resolution
    grid = np.asarray(Image.open(result.out_dir / "comparison.png"))
    assert grid.shape == (3 * (r + 2), n * (r + 2), 3)


def test_diffusion_family_refuses_a_vqgan(smoke_diffusion, tmp_path):
    vqgan_dir = smoke_diffusion.art.tokenizer  # the masked family's tokenizers (base is a VQGAN)
    with pytest.raises(BadInputError, match="tokenizer.json: a vqgan tokenizer; .*set tokenizer.kind: kl") as e:
        run_stage(smoke_diffusion, tmp_path / "out", tmp_path / "ckpt", tokenizer_dir=vqgan_dir)
    assert "\n" not in str(e.value) and str(vqgan_dir / "base") in str(e.value)


def test_diffusion_base_model_trained_on_other_latents_is_refused(smoke_diffusion, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(smoke_diffusion.base, base)
    meta = json.loads((base / "diffusion.json").read_text())
    meta["tokens"] = "0" * 64
    (base / "diffusion.json").write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="base diffusion model was trained on other latents than .*re-run the base"
                       ) as e:
        run_stage(smoke_diffusion, tmp_path / "out", tmp_path / "ckpt", base_dir=base)
    assert "\n" not in str(e.value) and str(base) in str(e.value)
    with pytest.raises(BadInputError, match="diffusion.json: missing"):
        run_stage(smoke_diffusion, tmp_path / "out", tmp_path / "ckpt", base_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("what", ["encoder", "superres model"])
def test_diffusion_family_frozen_part_changed_fails(smoke_diffusion, tmp_path, what):
    from lightning.pytorch.callbacks import Callback

    superres = tmp_path / "superres"
    shutil.copytree(smoke_diffusion.superres, superres)

    class Tamper(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx != 1:
                return
            if what == "encoder":
                with torch.no_grad():
                    pl_module.tokenizer.vae.encoder.conv_in.weight.mul_(1.01)
            else:
                with (superres / "diffusion.safetensors").open("ab") as f:
                    f.write(b"\0")

    match = "super-res diffusion model" if what == "superres model" else "encoder and quant_conv"
    with pytest.raises(StageError, match=f"decoder_ft: frozen {match}.* changed") as e:
        run_stage(smoke_diffusion, tmp_path / "out", tmp_path / "ckpt", superres_dir=superres,
                            callbacks=[Tamper()])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "tokenizer.safetensors").exists()
    assert not (tmp_path / "ckpt").exists()
