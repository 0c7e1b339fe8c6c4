"""models.losses and models.discriminator: GAN losses, adaptive weight, PSNR, perceptual loss."""

import math

import pytest
import torch
from safetensors.torch import save_file

from models.discriminator import PatchDiscriminator
from models.losses import (
    LPIPS_TAPS,
    VGG16_CONVS,
    PerceptualLoss,
    adaptive_gan_weight,
    generator_adv_loss,
    hinge_d_loss,
    psnr,
)


def test_hinge_losses_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2 -> mean 5/6
    fake = torch.tensor([-2.0, 0.0])  # relu(1 + f) = 0, 1 -> mean 0.5
    assert math.isclose(hinge_d_loss(real, fake).item(), 0.5 * (5 / 6 + 0.5), rel_tol=1e-6)
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # margins met
    assert math.isclose(generator_adv_loss(torch.tensor([1.0, 3.0])).item(), -2.0)


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    torch.manual_seed(0)
    last = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4)
    out = x @ last  # [5,3]
    rec = out.pow(2).mean()
    g = -(out * 0.1).sum()
    w = adaptive_gan_weight(rec, g, last)
    gr = torch.autograd.grad(rec, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last, retain_graph=True)[0]
    assert torch.allclose(w, gr.norm() / (gg.norm() + 1e-4))
    assert not w.requires_grad
    (rec + w * g).backward()  # graph retained: both losses still backpropagate
    assert adaptive_gan_weight((x @ last).sum(), 1e-12 * (x @ last).sum(), last, max_weight=10.0).item() == 10.0


def test_psnr_values():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(x, x).item() > 100  # identical: large, finite
    # constant offset 0.1 -> mse 0.01 -> 10 log10(4 / 0.01) = 26.02 dB
    assert math.isclose(psnr(x, x + 0.1).item(), 10 * math.log10(4 / 0.01), rel_tol=1e-4)
    assert math.isclose(psnr(x, x + 0.1, data_range=1.0).item(), 20.0, rel_tol=1e-4)
    with pytest.raises(ValueError, match="equal shapes"):
        psnr(x, x[:1])


def test_patch_discriminator_shapes():
    disc = PatchDiscriminator(in_channels=3, channels=8, n_layers=3)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 / 8 - 2
    assert disc(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)
    small = PatchDiscriminator(channels=8, n_layers=2)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match=">= 24"):
        disc(torch.randn(1, 3, 16, 16))


# a slim VGG16 (same layer layout, narrow convs) with random weights, as a torchvision export would key it
SLIM_WIDTHS = dict(zip(VGG16_CONVS, [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]))  # conv index -> out channels


def _slim_state(heads: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    state, prev = {}, 3
    for i, out in SLIM_WIDTHS.items():
        state[f"features.{i}.weight"] = torch.randn(out, prev, 3, 3, generator=g) * 0.3
        state[f"features.{i}.bias"] = torch.randn(out, generator=g) * 0.1
        prev = out
    if heads:
        for k, tap in enumerate(LPIPS_TAPS):
            c = SLIM_WIDTHS[tap - 1]
            state[f"lin{k}.weight"] = torch.rand(1, c, 1, 1, generator=g)
    return state


@pytest.mark.parametrize("heads", [False, True])
def test_perceptual_loss_with_random_weights(tmp_path, heads):
    path = tmp_path / "vgg.safetensors"
    save_file(_slim_state(heads), str(path))
    loss = PerceptualLoss.from_safetensors(path)
    assert (loss.heads is not None) == heads
    assert not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, y).item() > 0
    # gradients flow to the images (it is a training loss) but never into the frozen VGG
    x.requires_grad_(True)
    loss(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_perceptual_loss_bad_files(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(ValueError, match="not found"):
        PerceptualLoss.from_safetensors(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x01\x02not safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        PerceptualLoss.from_safetensors(corrupt)
    state = _slim_state(False)
    del state["features.10.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors: missing features.10.weight"):
        PerceptualLoss.from_safetensors(tmp_path / "partial.safetensors")
    state = _slim_state(False)
    state["features.2.weight"] = torch.zeros(4, 5, 3, 3)  # does not chain from conv 0's 4 channels
    save_file(state, str(tmp_path / "badshape.safetensors"))
    with pytest.raises(ValueError, match=r"features.2 has weight \[4, 5, 3, 3\]") as e:
        PerceptualLoss.from_safetensors(tmp_path / "badshape.safetensors")
    assert "\n" not in str(e.value)
    state = _slim_state(True)
    del state["lin3.weight"]
    save_file(state, str(tmp_path / "heads.safetensors"))
    with pytest.raises(ValueError, match="LPIPS heads"):
        PerceptualLoss.from_safetensors(tmp_path / "heads.safetensors")
