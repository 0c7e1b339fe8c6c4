"""Images of accepted items, read at random from the tar shards, as tensors for training and encoding.

Shards are indexed once (member -> byte offset), then every read is a seek, so the dataset works at
any scale, with DataLoader workers and with DistributedSampler, and never holds decoded images.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.errors import BadInputError


def member_offsets(shard: Path) -> dict[str, tuple[int, int]]:
    """Byte offset and size of every regular member of one of our shards."""
    with tarfile.open(shard, "r") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def square_resize(image: Image.Image, resolution: int, where: str) -> Image.Image:
    """Centre-crop to a square and resize to `resolution`; never upsamples (that would invent detail)."""
    width, height = image.size
    side = min(width, height)
    if side < resolution:
        raise BadInputError(
            f"{where}: image is {width}x{height}, smaller than the tokenizer's {resolution}x{resolution}; "
            f"raise validate.min_side to {resolution} or lower the tokenizer resolution")
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BOX)  # area average: no aliasing
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3] in 0..255
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (clamped)."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


AUGMENTATIONS = ("channel_permute", "hflip")


def augment(images: torch.Tensor, ops: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Label-free training augmentation, drawn per image from torch's global RNG; [B, 3, H, W] in and out.

    channel_permute: the RGB channels in one of the 6 orders, uniformly. Hues change while shapes and
    edges stay, so colour-shape pairs that never occur in train are not foreign to a tokenizer.
    hflip: mirrored left-right with probability 1/2.
    """
    unknown = [op for op in ops if op not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; expected one of {list(AUGMENTATIONS)}")
    batch = images.shape[0]
    if "channel_permute" in ops:
        if images.shape[1] != 3:
            raise ValueError(f"channel_permute needs RGB images [B, 3, H, W], got {tuple(images.shape)}")
        order = torch.rand(batch, 3, device=images.device).argsort(dim=1)  # [B, 3]: a uniform permutation
        images = images.gather(1, order[:, :, None, None].expand_as(images))
    if "hflip" in ops:
        flip = torch.rand(batch, device=images.device) < 0.5  # [B]
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def save_tiled(images: np.ndarray, path: Path, columns: int = 8) -> Path:
    """[N, H, W, 3] uint8 tiled row-major into one PNG with 2-pixel white gutters."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class ShardImageDataset(torch.utils.data.Dataset):
    """Item i of `manifest` (accepted rows) as a [3, R, R] tensor in [-1, 1]."""

    def __init__(self, data_dir: str | Path, manifest: pd.DataFrame, resolution: int):
        self.data_dir = Path(data_dir)
        self.resolution = resolution
        self.keys = manifest["key"].tolist()
        self._locations: list[tuple[str, int, int]] = []  # (shard, offset, size) per item
        offsets: dict[str, dict[str, tuple[int, int]]] = {}
        for shard, member in zip(manifest["shard"], manifest["image_member"]):
            if shard not in offsets:
                path = self.data_dir / shard
                if not path.is_file():
                    raise BadInputError(f"{path}: shard listed in the manifest is missing (re-run the data stage)")
                offsets[shard] = member_offsets(path)
            if member not in offsets[shard]:
                raise BadInputError(f"{self.data_dir / shard}: no member {member!r} (manifest and shards disagree)")
            self._locations.append((shard, *offsets[shard][member]))

    def __len__(self) -> int:
        return len(self._locations)

    def __getitem__(self, index: int) -> torch.Tensor:
        shard, offset, size = self._locations[index]
        with open(self.data_dir / shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        where = f"{self.data_dir / shard}:{self.keys[index]}"
        with Image.open(io.BytesIO(data)) as image:
            return to_tensor(square_resize(image.convert("RGB"), self.resolution, where))
