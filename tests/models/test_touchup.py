"""Region touch-ups (models.touchup) and the masked cascade's img2img they run on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.touchup import crop_box, feathered, load_segmenter, segment_region, touch_up
from tests.models.test_sampling import _cascade, _text


class RecordingCascade:
    """resolution R; img2img records its inputs and returns a constant image (+1 everywhere)."""

    def __init__(self, resolution: int = 16):
        self.resolution = resolution
        self.calls: list[tuple] = []

    def img2img(self, prompts, images, strength, seed=0):
        self.calls.append((list(prompts), images.clone(), strength, seed))
        return torch.ones_like(images)


def _box_region(h=32, w=32, x0=10, y0=12, x1=16, y1=20) -> torch.Tensor:
    region = torch.zeros(h, w, dtype=torch.bool)
    region[y0:y1, x0:x1] = True
    return region


# --- the crop ------------------------------------------------------------------------------------


def test_crop_box_grows_the_bounding_box_by_expand_of_its_side_and_is_square():
    region = _box_region()  # x 10..16 (6 wide), y 12..20 (8 high): side 8, centre (13, 16)
    assert crop_box(region, 0.0) == (9, 12, 8)
    assert crop_box(region, 0.5) == (5, 8, 16)  # 8 * (1 + 2 * 0.5)
    assert crop_box(region, 0.25) == (7, 10, 12)


def test_crop_box_is_shifted_then_clamped_to_stay_inside_the_image():
    corner = _box_region(x0=0, y0=0, x1=4, y1=4)
    assert crop_box(corner, 1.0) == (0, 0, 12)  # would start at -4: shifted in
    far = _box_region(x0=28, y0=26, x1=32, y1=32)
    x0, y0, side = crop_box(far, 1.0)
    assert side == 18 and x0 + side == 32 and y0 + side == 32
    assert crop_box(_box_region(x0=2, y0=2, x1=30, y1=30), 2.0) == (0, 0, 32)  # no larger than the image
    wide = torch.zeros(16, 40, dtype=torch.bool)
    wide[4:8, 4:36] = True
    assert crop_box(wide, 0.5)[2] == 16  # a non-square image: clamped to its shorter side


def test_crop_box_refuses_empty_regions_and_bad_expand():
    with pytest.raises(ValueError, match="region is empty"):
        crop_box(torch.zeros(8, 8, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="expand must be"):
        crop_box(_box_region(), -0.1)


# --- the blend weight ----------------------------------------------------------------------------


def test_feather_ramps_inward_and_is_zero_outside():
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[4:28, 4:28] = True
    w = feathered(region, 2)
    assert (w[~region] == 0).all()
    assert torch.allclose(w[16, 4:8], torch.tensor([1 / 5, 3 / 5, 1.0, 1.0]))  # (2d + 1) / (2f + 1)
    assert (w[8:24, 8:24] == 1).all()
    assert torch.equal(feathered(region, 0), region.float())
    # the image border is not a region edge: a region touching it is not feathered there
    full_left = torch.zeros(16, 16, dtype=torch.bool)
    full_left[:, :8] = True
    assert (feathered(full_left, 2)[4:12, 0] == 1).all()


def test_a_region_thinner_than_the_feather_still_has_a_fully_replaced_core():
    line = torch.zeros(16, 16, dtype=torch.bool)
    line[8, 2:14] = True  # one pixel high: any feather would leave it at weight < 1 (or 0)
    w = feathered(line, 3)
    assert torch.equal(w, line.float())
    band = torch.zeros(16, 16, dtype=torch.bool)
    band[6:9, 2:14] = True  # three pixels high: feather 1 fits, 3 does not
    assert torch.equal(feathered(band, 3), feathered(band, 1)) and feathered(band, 1).max() == 1
    with pytest.raises(ValueError, match="feather must be an integer >= 0"):
        feathered(band, -1)


# --- touch_up ------------------------------------------------------------------------------------


def test_touch_up_changes_only_the_region_and_sends_the_resized_crop():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=g) * 2 - 1
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[10:22, 12:20] = True
    cascade = RecordingCascade(resolution=16)
    out = touch_up(image, region, "a red circle", cascade, expand=0.25, strength=0.4, feather=1, seed=9)
    assert out.shape == image.shape
    assert torch.equal(out[:, ~region], image[:, ~region])  # bit-exact outside the region
    weight = feathered(region, 1)
    core = weight == 1
    assert core.any() and torch.allclose(out[:, core], torch.ones(3, int(core.sum())))  # fully the new crop
    edge = (weight > 0) & (weight < 1)
    expected = weight[edge] * 1 + (1 - weight[edge]) * image[:, edge]
    assert torch.allclose(out[:, edge], expected)
    [(prompts, crop, strength, seed)] = cascade.calls
    assert prompts == ["a red circle"] and strength == 0.4 and seed == 9
    x0, y0, side = crop_box(region, 0.25)
    assert side == 18 and crop.shape == (1, 3, 16, 16)
    resized = F.interpolate(image[None, :, y0:y0 + side, x0:x0 + side], size=(16, 16), mode="bilinear",
                            antialias=True, align_corners=False)
    assert torch.allclose(crop, resized.clamp(-1, 1))


def test_touch_up_refuses_empty_and_mismatched_masks():
    image = torch.zeros(3, 16, 16)
    with pytest.raises(ValueError, match="region is empty"):
        touch_up(image, torch.zeros(16, 16, dtype=torch.bool), "a red circle", RecordingCascade())
    with pytest.raises(ValueError, match="region mask is \\[8, 8\\], the image is \\[16, 16\\]"):
        touch_up(image, torch.ones(8, 8, dtype=torch.bool), "a red circle", RecordingCascade())
    with pytest.raises(ValueError, match="float \\[3, H, W\\]"):
        touch_up(torch.zeros(16, 16), torch.ones(16, 16, dtype=torch.bool), "x", RecordingCascade())


def test_touch_up_on_a_real_cascade_is_deterministic_and_keeps_the_outside():
    cascade = _cascade()
    text, mask = _text(1)
    cascade.encode_text = lambda prompts: (text, mask)  # no text encoder in this test
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    region = _box_region(24, 24, x0=6, y0=6, x1=14, y1=12)
    a = touch_up(image, region, "a red circle", cascade, expand=0.5, strength=0.5, feather=1, seed=3)
    assert torch.equal(a, touch_up(image, region, "a red circle", cascade, expand=0.5, strength=0.5, feather=1, seed=3))
    assert torch.equal(a[:, ~region], image[:, ~region]) and not torch.equal(a[:, region], image[:, region])
    assert a.min() >= -1 and a.max() <= 1


# --- img2img on the masked cascade ----------------------------------------------------------------


def _img2img_setup():
    cascade = _cascade()
    text, mask = _text(2)
    cascade.encode_text = lambda prompts: (text[:len(prompts)], mask[:len(prompts)])
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    return cascade, text, mask, images


def test_img2img_at_full_strength_is_plain_generation_with_the_same_seeds():
    cascade, text, mask, images = _img2img_setup()
    out = cascade.img2img(["a", "b"], images, 1.0, seed=6)
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out, cascade.generate_from_text(text, mask, seed=6))


def test_img2img_regenerates_a_strength_share_of_the_tokens_from_a_seeded_draw(monkeypatch):
    import models.cascade as cascade_mod

    cascade, text, mask, images = _img2img_setup()
    decoded = []
    cascade.decode_tokens = lambda tokens: decoded.append(tokens) or torch.zeros(tokens.shape[0], 3, 16, 16)
    original = cascade.decoder.encode(images).flatten(1)  # [2, 64]
    fed, real_decode = [], cascade_mod.decode

    def spy(model, *args, **kwargs):
        fed.append((model, kwargs.get("init_tokens"), kwargs.get("regenerate")))
        return real_decode(model, *args, **kwargs)

    monkeypatch.setattr(cascade_mod, "decode", spy)
    cascade.img2img(["a", "b"], images, 0.25, seed=2)
    cascade.img2img(["a", "b"], images, 0.25, seed=2)
    cascade.img2img(["a", "b"], images, 0.25, seed=3)
    (_, low_init, low_regen), (_, high_init, high_regen) = fed[:2]
    assert torch.equal(high_init, original)
    low_images = F.interpolate(images, size=(8, 8), mode="area")  # the base tokenizer's resolution
    assert torch.equal(low_init, cascade.base_tokenizer.encode(low_images).flatten(1))
    assert low_regen.sum(1).tolist() == [4, 4] and high_regen.sum(1).tolist() == [16, 16]  # round(0.25 * N)
    assert not torch.equal(high_regen[0], high_regen[1])  # each image draws its own positions
    # only re-masked positions may change; the rest are the image's own tokens
    assert torch.equal(decoded[0][~high_regen], original[~high_regen])
    # deterministic for a seed, different positions for another
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(fed[3][2], high_regen)
    assert not torch.equal(fed[5][2], high_regen)


def test_img2img_refuses_bad_strength_and_shapes():
    cascade, text, mask, images = _img2img_setup()
    for strength in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="strength must be in \\(0, 1\\]"):
            cascade.img2img(["a", "b"], images, strength)
    with pytest.raises(ValueError, match="images must be \\[B, 3, 16, 16\\]"):
        cascade.img2img(["a", "b"], images[..., :8, :8], 0.5)
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        cascade.img2img(["a", "b"], images[:1], 0.5)


# --- user-supplied segmenters ----------------------------------------------------------------------


def left_half(image: np.ndarray, caption: str) -> np.ndarray:
    """A segmenter for the tests: the left half of the image, whatever the caption."""
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[:, : image.shape[1] // 2] = True
    return mask


def nothing(image: np.ndarray, caption: str) -> np.ndarray:
    return np.zeros(image.shape[:2], dtype=bool)


def test_segmenters_load_by_module_function_and_their_masks_are_checked():
    image = np.zeros((8, 10, 3), dtype=np.uint8)
    fn = load_segmenter("tests.models.test_touchup:left_half")
    mask = segment_region(fn, image, "a red circle")
    assert mask.dtype == bool and mask.shape == (8, 10) and mask[:, :5].all() and not mask[:, 5:].any()
    with pytest.raises(ValueError, match="found no region for 'a red circle'"):
        segment_region(load_segmenter("tests.models.test_touchup:nothing"), image, "a red circle")
    with pytest.raises(ValueError, match="mask of shape \\[4, 4\\]"):
        segment_region(lambda im, c: np.ones((4, 4), bool), image, "x")


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'module:function'"),
    ("no_such_module_xyz:fn", "cannot import no_such_module_xyz"),
    ("tests.models.test_touchup:absent", "has no callable 'absent'"),
])
def test_bad_segmenter_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        load_segmenter(spec)
    assert "\n" not in str(err.value)
