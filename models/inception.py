"""The FID InceptionV3: 2048-d pool3 features for standard FID, from a weights file the user supplies.

This is the network of pytorch-fid / torch-fidelity (TensorFlow's 2015-12-05 Inception graph): the
torchvision Inception3 layout with 1008 classes and no aux head, where the A/C/E blocks average-pool
without counting the zero padding (TensorFlow's pooling) and the last E block max-pools instead.
Parameter names and shapes equal pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, so that file
(or a safetensors copy of it) loads directly. Written here because torchvision and torch-fidelity
are not allowed on these machines (their wheels pin a CUDA torch).

    images [B,3,H,W] in [0,1] --bilinear 299x299, *2-1--> Conv/Mixed stack --avg pool--> [B,2048]

Use with torchmetrics: `FrechetInceptionDistance(feature=load_fid_inception(path), normalize=True)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's classifier; kept only so the weights file's fc.* keys load


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv: object):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average that, like TensorFlow's, ignores the zero padding (the FID patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: in_channels -> 224 + pool_features (Mixed_5b/5c/5d)."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 288 -> 768 (Mixed_6a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions: 768 -> 768 (Mixed_6b..6e)."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 768 -> 1280 (Mixed_7a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block: in_channels -> 2048 (Mixed_7b: TF average pool; Mixed_7c: max pool, as in the TF graph)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """images [B,3,H,W] float in [0,1] -> pool3 features [B,2048]; frozen, always in eval mode."""

    num_features = 2048  # torchmetrics FrechetInceptionDistance reads this instead of probing

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)  # unused for FID features; present for the weights' keys
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # a fixed yardstick: BN must keep its running statistics

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ValueError(f"FID Inception: expected float images [B, 3, H, W] in [0, 1], got {images01.dtype} "
                             f"{list(images01.shape)}")
        weight = self.Conv2d_1a_3x3.conv.weight
        x = images01.to(weight.device, weight.dtype)
        # pytorch-fid's preprocessing: plain bilinear resize (no antialias), then [0,1] -> [-1,1]
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B,64,147,147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B,64,73,73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B,192,71,71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B,192,35,35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B,288,35,35]
        x = self.Mixed_6a(x)  # [B,768,17,17]
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # [B,768,17,17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B,2048,8,8]
        return x.mean(dim=(2, 3)).float()  # [B,2048]


def _read_state(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors, or .pth/.pt read with torch.load(weights_only=True)."""
    from models.weights import read_safetensors

    if path.suffix == ".safetensors":
        return read_safetensors(path, missing="FID Inception weights file not found")
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: FID Inception weights must be .pth, .pt or .safetensors")
    if not path.is_file():
        raise ValueError(f"{path}: FID Inception weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpicklable or non-tensor content, truncated file, ...
        raise ValueError(f"{path}: not a loadable weights file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (pytorch-fid's pt_inception-2015-12-05 file)")
    return state


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """Build FIDInceptionV3 and load `path` into it; every key and shape must match (num_batches_tracked,
    unused in eval, may be absent). Returns the frozen model in eval mode; one-line ValueErrors."""
    path = Path(path)
    state = _read_state(path)
    model = FIDInceptionV3()
    own = model.state_dict()
    optional = {k for k in own if k.endswith(".num_batches_tracked")}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise ValueError(f"{path}: not FID InceptionV3 weights (pytorch-fid layout): {what} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{path}: {k} has shape {list(v.shape)}, FID InceptionV3 needs {list(own[k].shape)}")
    model.load_state_dict(state, strict=False)  # every key checked above; only num_batches_tracked may be absent
    return model
