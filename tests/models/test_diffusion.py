"""models/diffusion.py, models/diffusion_sampling.py and models/diffusion_cascade.py: denoisers, targets, guidance, thresholding,
noise conditioning augmentation, img2img, saving, and the cascade's contracts."""

import pytest
import torch
from torch import nn

from models.diffusion import (
    DiffusionModel,
    DiffusionSpec,
    augmentation_step,
    check_latent_contract,
    diffusion_loss,
    drop_text,
    load_diffusion,
    null_text,
    save_diffusion,
    training_schedule,
)
from models.diffusion_sampling import DiffusionSampler, sample

TEXT_DIM, TEXT_LEN = 24, 6


def dit(**kw) -> DiffusionSpec:
    return DiffusionSpec(**{**dict(backbone="dit", channels_in=4, size=4, text_dim=TEXT_DIM, text_length=TEXT_LEN,
                                   width=32, depth=2, heads=2, train_timesteps=100), **kw})


def unet(**kw) -> DiffusionSpec:
    return DiffusionSpec(**{**dict(backbone="unet", channels_in=4, size=8, text_dim=TEXT_DIM, text_length=TEXT_LEN,
                                   unet_channels=(8, 16), attention_head_dim=8, train_timesteps=100), **kw})


def superres(**kw) -> DiffusionSpec:
    return unet(**{**dict(channels_in=3, size=16, low_res=8), **kw})


def text(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, :4] = True
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), mask


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"dit": DiffusionModel(dit()).eval(), "unet": DiffusionModel(unet()).eval(),
            "superres": DiffusionModel(superres()).eval()}


# --- architecture -------------------------------------------------------------------------------

def test_dit_is_pixart_with_zero_cross_attention_output_and_adaln_single(models):
    net = models["dit"].net
    assert type(net).__name__ == "PixArtTransformer2DModel"
    for block in net.transformer_blocks:
        assert torch.count_nonzero(block.attn2.to_out[0].weight) == 0 and torch.count_nonzero(block.attn2.to_out[0].bias) == 0
        assert block.scale_shift_table.shape == (6, 32)  # the learned per-block embedding
    assert net.adaln_single is not None  # one time MLP shared by every block


def test_zero_cross_attention_means_text_only_matters_after_training(models):
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 50])
    a, b = text(2, 0), text(2, 1)
    model = models["dit"]
    assert torch.allclose(model(x, t, *a), model(x, t, *b))  # identity path at initialisation
    trained = DiffusionModel(dit())
    trained.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in trained.net.transformer_blocks:
            block.attn2.to_out[0].weight.normal_()
    assert not torch.allclose(trained(x, t, *a), trained(x, t, *b))


def test_unet_adds_pooled_text_to_the_time_embedding(models):
    net = models["unet"].net
    assert type(net).__name__ == "UNet2DConditionModel"
    assert net.class_embedding.linear_1.in_features == TEXT_DIM  # pooled text -> time embedding
    sr = models["superres"].net
    assert sr.conv_in.in_channels == 6  # noisy image ++ upsampled low-res
    assert sr.class_embedding.linear_1.in_features > TEXT_DIM  # + the augmentation level


def test_attention_only_at_the_lowest_levels():
    net = DiffusionModel(superres(unet_channels=(8, 16, 16), size=16, attention_levels=1)).net
    kinds = [type(b).__name__ for b in net.down_blocks]
    assert kinds == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]


@pytest.mark.parametrize("bad, message", [
    (dict(backbone="vit"), "backbone"), (dict(prediction="x0"), "prediction"), (dict(width=31), "multiple of heads"),
    (dict(size=5, patch_size=2), "patch_size"), (dict(low_res=2), "U-Net"),
])
def test_bad_specs_are_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        dit(**bad)


def test_wrong_sample_shape_is_an_error(models):
    with pytest.raises(ValueError, match=r"expects samples \[B,4,4,4\]"):
        models["dit"](torch.randn(1, 4, 8, 8), torch.tensor([1]), *text(1))


# --- training ---------------------------------------------------------------------------------

class Oracle(nn.Module):
    """Knows x0 and returns the exact eps or v target for whatever x_t it is given."""

    def __init__(self, spec, schedule, x0, wrong: bool = False):
        super().__init__()
        self.spec, self.schedule, self.x0, self.wrong = spec, schedule, x0, wrong
        self.seen_aug = None

    def forward(self, x_t, t, text, text_mask, low_res=None, aug_level=None):
        self.seen_aug = aug_level
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        v = a.sqrt() * eps - (1 - a).sqrt() * self.x0
        want = "v_prediction" if self.wrong == (self.spec.prediction == "epsilon") else "epsilon"
        return v if want == "v_prediction" else eps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_prediction_type(prediction):
    spec = unet(prediction=prediction)
    schedule = training_schedule(spec)
    x0 = torch.randn(8, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    right = diffusion_loss(Oracle(spec, schedule, x0), schedule, x0, *text(8), g).loss
    wrong = diffusion_loss(Oracle(spec, schedule, x0, wrong=True), schedule, x0, *text(8), g).loss
    assert right < 1e-8 < 1e-2 < wrong


def test_training_draws_augmentation_levels_up_to_train_max():
    spec = superres()
    schedule = training_schedule(spec)
    x0, low = torch.rand(64, 3, 16, 16) * 2 - 1, torch.rand(64, 3, 8, 8) * 2 - 1
    oracle = Oracle(spec, schedule, x0)
    parts = diffusion_loss(oracle, schedule, x0, *text(64), torch.Generator().manual_seed(0), low, aug_max=0.5)
    top = augmentation_step(spec, 0.5)
    assert torch.equal(oracle.seen_aug, parts.aug_steps)
    assert int(parts.aug_steps.min()) >= 0 and int(parts.aug_steps.max()) <= top
    assert len(set(parts.aug_steps.tolist())) > 20  # random levels, not one fixed level
    none = diffusion_loss(oracle, schedule, x0, *text(64), torch.Generator().manual_seed(0), low, aug_max=0.0)
    assert int(none.aug_steps.max()) == 0


def test_null_text_and_dropout():
    t, m = text(3)
    empty, empty_mask = null_text(t, m)
    assert torch.count_nonzero(empty) == 0 and empty_mask.sum(1).tolist() == [1, 1, 1]
    dropped_text, dropped_mask = drop_text(t, m, torch.tensor([True, False, True]))
    assert torch.equal(dropped_text[1], t[1]) and torch.equal(dropped_mask[1], m[1])
    assert torch.count_nonzero(dropped_text[0]) == 0 and dropped_mask[2].sum() == 1


# --- sampling ---------------------------------------------------------------------------------

class Spy(nn.Module):
    """Wraps a model and records the batch sizes, text and augmentation levels it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.spec, self.calls = model, model.spec, []

    def forward(self, x_t, t, text, text_mask, low_res=None, aug_level=None):
        self.calls.append({"batch": x_t.shape[0], "text": text, "aug": aug_level})
        return self.model(x_t, t, text, text_mask, low_res, aug_level)


@pytest.mark.parametrize("sampler", ["dpm", "ddim"])
def test_sampling_is_deterministic_per_image_seed(models, sampler):
    t, m = text(3)
    settings = DiffusionSampler(sampler=sampler, steps=4, guidance=2.0)
    a = sample(models["dit"], t, m, settings, [5, 6, 7])
    b = sample(models["dit"], t[1:], m[1:], settings, [6, 7])
    assert a.shape == (3, 4, 4, 4) and torch.allclose(a[1:], b, atol=1e-5)
    assert not torch.allclose(a, sample(models["dit"], t, m, settings, [8, 9, 10]))


def test_guidance_batches_conditional_and_unconditional_and_negative_prompts_replace_null(models):
    spy = Spy(models["dit"])
    t, m = text(2)
    sample(spy, t, m, DiffusionSampler(steps=3, guidance=0.0), [0, 1])
    assert [c["batch"] for c in spy.calls] == [2, 2, 2]
    spy.calls.clear()
    sample(spy, t, m, DiffusionSampler(steps=3, guidance=3.0), [0, 1])
    assert [c["batch"] for c in spy.calls] == [4, 4, 4]
    assert torch.count_nonzero(spy.calls[0]["text"][2:]) == 0  # the null text
    spy.calls.clear()
    neg, neg_mask = text(2, seed=9)
    sample(spy, t, m, DiffusionSampler(steps=3, guidance=3.0), [0, 1], neg, neg_mask)
    assert torch.equal(spy.calls[0]["text"][2:], neg)


def test_sampling_uses_the_fixed_augmentation_level(models):
    spy = Spy(models["superres"])
    t, m = text(2)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    out = sample(spy, t, m, DiffusionSampler(steps=3), [0, 1], low_res=low, aug_level=0.25)
    assert out.shape == (2, 3, 16, 16)
    want = augmentation_step(spy.spec, 0.25)
    assert all(c["aug"].tolist() == [want, want] for c in spy.calls)
    with pytest.raises(ValueError, match="low-res"):
        sample(spy, t, m, DiffusionSampler(steps=2), [0, 1])


def test_dynamic_thresholding_keeps_high_guidance_in_range(models):
    t, m = text(4)
    low = torch.rand(4, 3, 8, 8) * 2 - 1
    results = {}
    for mode in ("none", "dynamic", "static"):
        trace: list = []
        x = sample(models["superres"], t, m, DiffusionSampler(steps=6, guidance=30.0, thresholding=mode), [0, 1, 2, 3],
                   low_res=low, aug_level=0.1, trace=trace)
        results[mode] = (x, trace)
    unclipped, _ = results["none"]
    assert unclipped.abs().max() > 5  # guidance 30 saturates: clamping would flatten most pixels
    assert (unclipped.abs() >= 1).float().mean() > 0.5
    dynamic, trace = results["dynamic"]
    assert dynamic.abs().max() <= 1 + 1e-4
    assert all(x0.abs().max() <= 1 + 1e-4 for x0 in trace if x0 is not None)
    # dynamic rescales instead of clipping: far fewer pixels pinned at the bounds than static clipping
    static, _ = results["static"]
    assert (dynamic.abs() > 0.999).float().mean() < (static.abs() > 0.999).float().mean()


def test_img2img_keeps_the_init_at_low_strength(models):
    t, m = text(2)
    init = torch.randn(2, 4, 4, 4)
    plain = sample(models["dit"], t, m, DiffusionSampler(steps=10), [0, 1])
    full = sample(models["dit"], t, m, DiffusionSampler(steps=10), [0, 1], init=init, strength=1.0)
    assert torch.allclose(plain, full)
    light = sample(models["dit"], t, m, DiffusionSampler(steps=10), [0, 1], init=init, strength=0.2)
    heavy = sample(models["dit"], t, m, DiffusionSampler(steps=10), [0, 1], init=init, strength=0.8)
    assert (light - init).abs().mean() < (heavy - init).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        sample(models["dit"], t, m, DiffusionSampler(steps=10), [0, 1], init=init, strength=0.0)


@pytest.mark.parametrize("bad", [dict(sampler="euler"), dict(steps=0), dict(guidance=-1.0), dict(thresholding="soft")])
def test_bad_sampler_settings(bad):
    with pytest.raises(ValueError):
        DiffusionSampler(**bad)


# --- saving and contracts ---------------------------------------------------------------------

def test_save_load_round_trip_and_one_line_errors(models, tmp_path):
    save_diffusion(models["unet"], tmp_path / "m", extra={"phase": "align"})
    loaded = load_diffusion(tmp_path / "m")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([3])
    assert torch.allclose(loaded(x, t, *text(1)), models["unet"](x, t, *text(1)))
    with pytest.raises(ValueError, match="unet_channels"):
        load_diffusion(tmp_path / "m", expect=unet(unet_channels=(8, 8)))
    (tmp_path / "m" / "diffusion.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="corrupt") as err:
        load_diffusion(tmp_path / "m")
    assert "\n" not in str(err.value)


def test_latent_contract():
    check_latent_contract(dit(), latent_channels=4, grid=4)
    with pytest.raises(ValueError, match=r"KL tokenizer's latents \[8,4,4\]"):
        check_latent_contract(dit(), latent_channels=8, grid=4)
    with pytest.raises(ValueError, match="super-res"):
        check_latent_contract(superres(), latent_channels=3, grid=16)


def test_cascade_contracts_at_construction(models):
    from models.diffusion_cascade import DiffusionCascade, DiffusionCascadeSettings
    from models.tokenizer import ImageTokenizer, TokenizerSpec

    def vae(kind="kl", resolution=8, latent_channels=4, downsample=2):
        channels = (8,) * (downsample.bit_length())  # one block per halving, plus one
        return ImageTokenizer(TokenizerSpec(kind=kind, resolution=resolution, downsample=downsample, channels=channels,
                                            layers_per_block=1, latent_channels=latent_channels,
                                            codebook_size=16 if kind == "vqgan" else 0, norm_groups=4))

    settings = DiffusionCascadeSettings(DiffusionSampler(steps=2), DiffusionSampler(steps=2, thresholding="dynamic"), 0.1)
    cascade = DiffusionCascade(None, models["dit"], models["superres"], vae(), settings, text_dim=TEXT_DIM)
    t, m = text(2)
    images = cascade.generate_from_text(t, m, seeds=[0, 1])
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    edited = cascade.base_images(t, m, [0, 1], init=torch.randn(2, 4, 4, 4), strength=0.5)
    assert edited.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="KL-VAE"):
        DiffusionCascade(None, models["dit"], models["superres"], vae("vqgan"), settings)
    with pytest.raises(ValueError, match="latents"):
        DiffusionCascade(None, models["dit"], models["superres"], vae(latent_channels=8), settings)
    with pytest.raises(ValueError, match="8px inputs"):
        DiffusionCascade(None, models["dit"], models["superres"], vae(resolution=16, downsample=4), settings)
    with pytest.raises(ValueError, match="text of width"):
        DiffusionCascade(None, models["dit"], models["superres"], vae(), settings, text_dim=7)


class PointOracle(nn.Module):
    """The denoiser of a one-point data distribution x*, off by a small fixed error (as a trained
    network is): sampling must still land near x*."""

    def __init__(self, spec, target):
        super().__init__()
        self.spec, self.target = spec, target
        self.alphas = training_schedule(spec).alphas_cumprod
        self.anchor = nn.Parameter(torch.zeros(()))  # sample() reads the device from the parameters

    def forward(self, x_t, t, text, text_mask, low_res=None, aug_level=None):
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * self.target) / (1 - a).sqrt() + 0.02 * torch.cos(self.target * 7)
        return eps if self.spec.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.target


@pytest.mark.parametrize("sampler", ["dpm", "ddim"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear", "scaled_linear"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_samplers_land_on_the_data_under_a_nearly_exact_denoiser(sampler, beta_schedule, prediction):
    """Catches solver/schedule mismatches: e.g. DPM-Solver++ on the cosine schedule explodes near
    alpha = 0 unless lambda(t) is clipped."""
    spec = unet(beta_schedule=beta_schedule, prediction=prediction, train_timesteps=1000)
    target = torch.linspace(-1, 1, 4 * 8 * 8).view(1, 4, 8, 8)
    out = sample(PointOracle(spec, target), *text(2), DiffusionSampler(sampler=sampler, steps=10), [0, 1])
    assert (out - target).abs().max() < 0.2


class GaussianOracle(nn.Module):
    """The denoiser of N(0, I) data (E[eps | x_t] = sigma_t x_t), off by a small fixed error."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.alphas = training_schedule(spec).alphas_cumprod
        self.error = 0.05 * torch.randn(spec.channels_in, spec.size, spec.size, generator=torch.Generator().manual_seed(1))
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, text, text_mask, low_res=None, aug_level=None):
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x_t + self.error
        return eps if self.spec.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * (a.sqrt() * x_t)


@pytest.mark.parametrize("sampler", ["dpm", "ddim"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "scaled_linear"])
def test_a_slightly_wrong_epsilon_model_still_samples_the_data_scale(sampler, beta_schedule):
    """Unit-variance data must come out with about unit variance. Starting DPM-Solver++ at the cosine
    schedule's last step (alpha ~ 0) multiplies the epsilon error by sigma / alpha: std 78 here, and
    875 for the trained tiny DiT's latents."""
    spec = unet(beta_schedule=beta_schedule, train_timesteps=1000)
    out = sample(GaussianOracle(spec), *text(16), DiffusionSampler(sampler=sampler, steps=20), list(range(16)))
    assert 0.8 < float(out.std()) < 1.25
