"""Tokenizer training losses and metrics: hinge GAN losses, taming's adaptive GAN weight, PSNR,
and an optional LPIPS-style perceptual distance over VGG16 features.

The VGG16 layer stack is written out here because torchvision (which ships it) is forbidden in
this project; its parameter names follow torchvision's `features.{i}` so converted torchvision /
LPIPS weights load unchanged from a safetensors file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# adversarial


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def generator_adv_loss(fake_logits: Tensor) -> Tensor:
    """Generator (tokenizer) adversarial loss: -E[D(fake)]."""
    return -fake_logits.mean()


def adaptive_gan_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """Taming's lambda = ||grad_last rec_loss|| / (||grad_last g_loss|| + 1e-4), clamped to [0, max_weight].

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer.
    The graph is retained so both losses can still be backpropagated; the weight is detached.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# -----------------------------------------------------------------------------
# metrics


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Mean over the batch of per-image PSNR in dB; images [B,C,H,W], data_range 2 for [-1,1].

    Identical images give a large finite value (MSE floored at 1e-10: ~106 dB for range 2), so
    the number can be averaged and logged.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {list(x.shape)} and {list(y.shape)}")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)  # [B]
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))).mean()


# -----------------------------------------------------------------------------
# perceptual (LPIPS-style)

# torchvision's vgg16 `features`: conv index -> (in, out) channels; ReLU after every conv,
# max-pool at indices 4, 9, 16, 23 (and 30, which LPIPS does not use)
VGG16_CONVS: dict[int, tuple[int, int]] = {
    0: (3, 64), 2: (64, 64),
    5: (64, 128), 7: (128, 128),
    10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512),
    24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
VGG16_POOLS = (4, 9, 16, 23)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS' input scaling for images in [-1, 1]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: per tap, unit-normalise VGG16 features over channels, square the
    difference, weight channels by the LPIPS linear head (or equally, i.e. sum), average over
    positions; sum over the five taps; mean over the batch. Frozen; images in [-1, 1].

    Layer layout is VGG16's; conv widths come from the weights file (so tests can save a slim
    random copy), and must chain consistently.
    """

    def __init__(self, widths: dict[int, tuple[int, int]] | None = None, heads: bool = False):
        super().__init__()
        widths = widths or VGG16_CONVS
        layers: list[nn.Module] = []
        for i in range(LPIPS_TAPS[-1] + 1):
            if i in widths:
                c_in, c_out = widths[i]
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
            elif i in VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        tap_channels = [widths[t - 1][1] for t in LPIPS_TAPS]  # the conv right before each tapped ReLU
        self.heads = (
            nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_channels) if heads else None
        )
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always frozen/eval, whatever the parent module does

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y [B,3,H,W] in [-1,1] -> scalar distance (mean over the batch)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"PerceptualLoss needs two [B,3,H,W] batches of equal shape, got {list(x.shape)}, {list(y.shape)}"
            )
        total = x.new_zeros(x.shape[0])  # [B]
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            d = (_unit(fx) - _unit(fy)).pow(2)  # [B,C,h,w]
            d = self.heads[k](d) if self.heads is not None else d.sum(1, keepdim=True)  # [B,1,h,w]
            total = total + d.mean(dim=(1, 2, 3))
        return total.mean()

    @classmethod
    def from_safetensors(cls, path: str | Path) -> PerceptualLoss:
        """Weights with torchvision's `features.{i}.weight/bias` keys, plus optional LPIPS heads
        `lin{k}.weight` (k = 0..4; the lpips package's `lin{k}.model.1.weight` is accepted too)."""
        from models.weights import read_safetensors

        path = Path(path)
        state = read_safetensors(path, missing="perceptual-loss weights file not found")

        widths: dict[int, tuple[int, int]] = {}
        prev_out = 3
        for i in VGG16_CONVS:
            w, b = state.get(f"features.{i}.weight"), state.get(f"features.{i}.bias")
            if w is None or b is None:
                raise ValueError(f"{path}: missing features.{i}.weight/bias (expected torchvision VGG16 `features` keys)")
            if w.ndim != 4 or tuple(w.shape[1:]) != (prev_out, 3, 3) or tuple(b.shape) != (w.shape[0],):
                raise ValueError(
                    f"{path}: features.{i} has weight {list(w.shape)} / bias {list(b.shape)}, "
                    f"expected [C,{prev_out},3,3] / [C] for a VGG16 conv"
                )
            widths[i] = (prev_out, int(w.shape[0]))
            prev_out = int(w.shape[0])

        heads = {}
        for k in range(len(LPIPS_TAPS)):
            for key in (f"lin{k}.weight", f"lin{k}.model.1.weight"):
                if key in state:
                    heads[k] = state[key]
        if heads and len(heads) != len(LPIPS_TAPS):
            need = f"0..{len(LPIPS_TAPS) - 1}"
            raise ValueError(f"{path}: has LPIPS heads for taps {sorted(heads)} only; need all of {need} or none")

        model = cls(widths, heads=bool(heads))
        with torch.no_grad():
            for i in VGG16_CONVS:
                model.features[i].weight.copy_(state[f"features.{i}.weight"])
                model.features[i].bias.copy_(state[f"features.{i}.bias"])
            for k, w in heads.items():
                c = widths[LPIPS_TAPS[k] - 1][1]
                if w.numel() != c:
                    raise ValueError(f"{path}: lin{k} has {w.numel()} weights, tap {k} has {c} channels")
                model.heads[k].weight.copy_(w.reshape(1, c, 1, 1))
        return model


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise over channels (LPIPS' normalize_tensor). f [B,C,h,w]."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
