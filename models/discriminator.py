"""PatchGAN discriminator for VQGAN training (taming-transformers' NLayerDiscriminator layout).

Written here because the libraries that ship one (taming-transformers, lpips' training code)
pull in torchvision, which this project must not install.

Norm: GroupNorm instead of taming's BatchNorm: it has no running statistics, so it behaves the
same for real and fake batches, in train and eval mode, at batch size 1 on CPU and under DDP.
"""

from __future__ import annotations

from torch import Tensor, nn


def _groups(channels: int) -> int:
    """Largest of 32, 16, 8, ... that divides `channels` (GroupNorm needs a divisor)."""
    g = 32
    while channels % g:
        g //= 2
    return g


class PatchDiscriminator(nn.Module):
    """Image [B,C,H,W] -> real/fake logits map [B,1,h,w], one logit per overlapping patch.

    n_layers stride-2 4x4 convs (64 -> 128 -> 256 -> ... channels, capped at 8x), one stride-1 4x4
    conv, and a 4x4 conv to one channel: h = H / 2**n_layers - 2, so inputs need H, W >= 3 * 2**n_layers
    (n_layers=3: 24 px, n_layers=2: 12 px).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator needs n_layers >= 1, got {n_layers}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),  # no norm on the first layer (taming)
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution (-1 px)
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_groups(channels * mult), channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))  # logits map
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def min_input_size(self) -> int:
        return 3 * 2**self.n_layers

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"PatchDiscriminator(n_layers={self.n_layers}) needs [B,C,H,W] with H, W >= {self.min_input_size}, "
                f"got {list(images.shape)}; use fewer layers for small images"
            )
        return self.net(images)  # [B,1,H/2**n_layers - 2, W/2**n_layers - 2]


def _init_weights(m: nn.Module) -> None:
    # taming's weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
