import io

import numpy as np
import pytest
import torch
from PIL import Image

from components.errors import BadInputError
from components.images import ShardImageDataset, augment, square_resize, to_tensor, to_uint8
from components.io import Sample, ShardWriter, read_manifest


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def dataset_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(7)]
    with ShardWriter(tmp_path, shard_size=3) as writer:  # several shards: random access across them
        for i, a in enumerate(arrays):
            writer.write(Sample(key=f"k{i}", split="train", image=_png(a), image_ext="png", caption=b"x"))
    return tmp_path, arrays


def test_random_access_returns_each_image_exactly(dataset_dir):
    root, arrays = dataset_dir
    dataset = ShardImageDataset(root, read_manifest(root), resolution=16)
    assert len(dataset) == 7
    for i in (6, 0, 4, 2):  # out of order, across shards
        x = dataset[i]
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
        assert np.array_equal(to_uint8(x[None])[0], arrays[i])


def test_downscaling_averages_and_nonsquare_is_centre_cropped():
    image = Image.fromarray(np.concatenate([np.zeros((8, 4, 3), np.uint8), np.full((8, 12, 3), 255, np.uint8)], axis=1))
    out = square_resize(image, 4, "x")  # 8x16 -> centre 8x8 (cols 4..12: all white) -> 4x4
    assert out.size == (4, 4) and np.asarray(out).min() == 255
    assert torch.allclose(to_tensor(Image.new("RGB", (2, 2), (255, 0, 0)))[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_images_smaller_than_the_tokenizer_give_one_line_naming_the_item(dataset_dir):
    root, _ = dataset_dir
    dataset = ShardImageDataset(root, read_manifest(root), resolution=32)
    with pytest.raises(BadInputError, match=r"shards/train-000000.tar:k0: image is 16x16, smaller than the tokenizer's 32x32"):
        dataset[0]


def test_missing_shard_or_member_is_a_clear_error(dataset_dir):
    root, _ = dataset_dir
    manifest = read_manifest(root)
    (root / "shards" / "train-000002.tar").unlink()
    with pytest.raises(BadInputError, match="shard listed in the manifest is missing"):
        ShardImageDataset(root, manifest, 16)
    manifest = manifest.head(2).assign(image_member="nope.png")
    with pytest.raises(BadInputError, match="no member 'nope.png'"):
        ShardImageDataset(root, manifest, 16)


def test_channel_permute_draws_all_six_channel_orders_per_image_and_keeps_each_images_pixels():
    torch.manual_seed(0)
    images = torch.rand(600, 3, 4, 4)
    out = augment(images, ["channel_permute"])
    orders = set()
    for before, after in zip(images, out):
        order = tuple(int((before == c).all(dim=(1, 2)).nonzero()[0]) for c in after)  # source channel of each
        orders.add(order)
    assert orders == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)}
    assert torch.equal(out.sort(dim=1).values, images.sort(dim=1).values)  # only the channel order changed


def test_hflip_mirrors_about_half_the_images_and_leaves_the_rest():
    torch.manual_seed(0)
    images = torch.rand(400, 3, 2, 5)
    out = augment(images, ["hflip"])
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((flipped ^ kept).all()) and 150 < int(flipped.sum()) < 250


def test_the_config_offers_exactly_the_implemented_augmentations():
    from typing import get_args

    from components.config import Augmentation
    from components.images import AUGMENTATIONS

    assert get_args(Augmentation) == AUGMENTATIONS


def test_augment_refuses_unknown_ops_and_non_rgb_images():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment(torch.zeros(1, 3, 2, 2), ["rotate"])
    with pytest.raises(ValueError, match="channel_permute needs RGB"):
        augment(torch.zeros(1, 1, 2, 2), ["channel_permute"])
