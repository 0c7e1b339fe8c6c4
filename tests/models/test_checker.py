"""The exact checker reads the generator's images back, and rejects images that are wrong."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from models.checker import CheckResult, check, segment, score
from models.shapes import COLOURS, SHAPES, Placement, Scene, ShapeGroup, caption, generate, render

N_SCENES = 300
SWAPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def scenes():
    # train and test scenes: held-out pairs must read back as well as seen ones
    items = generate(0, n_train=200, n_val=0, n_test=N_SCENES - 200, image_size=64, max_objects=3, heldout_fraction=0.2)
    return [scene for _, _, scene in items]


def _with_groups(scene: Scene, placed: bool = True, **changes) -> Scene:
    """The scene with every group's attributes changed by `changes[attr](group)`."""
    groups = tuple(dataclasses.replace(g, **{k: f(g) for k, f in changes.items()}) for g in scene.groups)
    return Scene(groups, scene.relation, scene.objects if placed else ())


def _degraded(image: Image.Image, blur: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (radius in pixels) then gaussian pixel noise, as a generator's output might be."""
    image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=float) + rng.normal(0, sigma, (image.height, image.width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [64, 32])
def test_generated_images_read_back(scenes, size):
    result = score([render(s, size) for s in scenes], scenes)
    print(f"\nchecker on generated {size}px images: {result}")
    for category in ("colour", "shape", "count", "position", "overall"):
        assert result[category] >= 0.98, (category, result)
    assert result["n"] == N_SCENES and 0 < result["n_position"] < N_SCENES


def test_box_filtered_images_read_back(scenes):
    # what the stages feed a 32 px tokenizer: the 64 px data box-filtered (components.images),
    # so edges that fall mid-pixel blend with the background
    result = score([render(s, 64).resize((32, 32), Image.BOX) for s in scenes], scenes)
    print(f"\nchecker on 64px images box-filtered to 32px: {result}")
    for category in ("colour", "shape", "count", "position", "overall"):
        assert result[category] >= 0.99, (category, result)


@pytest.mark.parametrize("shape", SHAPES)
def test_small_shapes_read_at_any_sub_pixel_offset(shape):
    # small objects (radius 6-8 px at 64 px) box-filtered to 32 px with their edges on or mid-pixel:
    # a square's corner pixels are then covered a quarter, below the half that makes them
    # foreground, and must not round it into a circle
    misread = []
    for radius in np.arange(6.0, 8.01, 0.25):
        for dx, dy in itertools.product((0.0, 0.5, 1.0, 1.5), repeat=2):
            scene = Scene((ShapeGroup("orange", shape, "small", 1),), None,
                          (Placement(0, (24 + dx) / 64, (28 + dy) / 64, radius / 64),))
            read = [(o.colour, o.shape) for o in segment(render(scene, 64).resize((32, 32), Image.BOX))]
            if read != [("orange", shape)]:
                misread.append((radius, dx, dy, read))
    assert not misread, misread


def test_coverage_is_the_share_of_the_object_colour_in_a_blended_pixel():
    from models.checker import _classify_pixels, _coverage

    red, white = np.array(COLOURS["red"], dtype=np.float32), np.full(3, 255.0, dtype=np.float32)
    pixels = np.tile(white, (5, 5, 1))
    pixels[2, 2] = red  # the object
    pixels[2, 3] = 0.5 * red + 0.5 * white  # half covered: still foreground
    pixels[1, 1] = 0.25 * red + 0.75 * white  # a quarter: background, but in the ring
    pixels[0, 4] = red  # another object, not adjacent
    foreground, _ = _classify_pixels(pixels)
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 2:4] = True
    coverage = _coverage(pixels, 1 + list(COLOURS).index("red"), mask, foreground)
    np.testing.assert_allclose([coverage[2, 2], coverage[2, 3], coverage[1, 1]], [1.0, 0.5, 0.25], atol=0.01)
    assert coverage[0, 4] == 0 and coverage[2, 0] == 0  # beyond the ring: not this object's


def test_noise_and_blur_still_pass(scenes):
    rng = np.random.default_rng(0)
    degraded = {
        "64px blur 1.0 + noise 10": [_degraded(render(s, 64), 1.0, 10, rng) for s in scenes],
        "32px blur 0.5 + noise 8": [_degraded(render(s, 32), 0.5, 8, rng) for s in scenes],
        # a generated image may come at any size: 64px resized (bilinear) to 100px
        "64px resized to 100px": [render(s, 64).resize((100, 100), Image.BILINEAR) for s in scenes],
    }
    for name, images in degraded.items():
        result = score(images, scenes)
        print(f"\nchecker on {name}: {result}")
        for category in ("colour", "shape", "count", "position", "overall"):
            assert result[category] >= 0.95, (name, category, result)


def test_blank_image_fails_everything(scenes):
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    result = score([blank] * 50, scenes[:50])
    assert result["overall"] == 0 and result["colour"] == 0 and result["shape"] == 0 and result["count"] == 0
    assert result["position"] == 0


def test_recoloured_shapes_fail_colour_only(scenes):
    images, independent = [], []
    for s in scenes:
        # map each requested colour to one the caption does not mention
        unused = [c for c in COLOURS if c not in {g.colour for g in s.groups}]
        recolour = dict(zip(sorted({g.colour for g in s.groups}), unused))
        images.append(render(_with_groups(s, colour=lambda g: recolour[g.colour]), 64))
        # groups still tell apart by shape: only colour may fail
        independent.append(len({g.shape for g in s.groups}) == len(s.groups))
    results = [check(image, s) for image, s in zip(images, scenes)]
    assert sum(r.colour for r in results) == 0
    kept = [r for r, ok in zip(results, independent) if ok]
    assert len(kept) > N_SCENES // 2
    assert np.mean([r.shape and r.count and r.position is not False for r in kept]) >= 0.98


def test_swapped_relation_fails_position(scenes):
    relational = [s for s in scenes if s.relation]
    swapped = [Scene(s.groups, SWAPPED[s.relation]) for s in relational]
    result = score([render(s, 64) for s in relational], swapped)
    assert result["position"] <= 0.02
    assert result["colour"] >= 0.98 and result["count"] >= 0.98


def test_wrong_shape_fails_shape(scenes):
    # every shape becomes the next one: a permutation keeps the two groups distinct
    next_shape = {s: SHAPES[(i + 1) % len(SHAPES)] for i, s in enumerate(SHAPES)}
    images = [render(_with_groups(s, shape=lambda g: next_shape[g.shape]), 64) for s in scenes]
    result = score(images, scenes)
    assert result["shape"] <= 0.02
    assert result["colour"] >= 0.98  # wrong shapes, right colours


def test_missing_and_extra_objects_fail_count(scenes):
    images = [render(s, 64) for s in scenes]
    # the image has one object fewer than the caption asks for
    more = [_with_groups(s, placed=False, count=lambda g: min(g.count + 1, 3)) for s in scenes]
    more = [(image, m) for image, m, s in zip(images, more, scenes) if m.groups != s.groups]
    assert score(*zip(*more))["count"] <= 0.02
    # the image has one object more than the caption asks for
    fewer = [_with_groups(s, placed=False, count=lambda g: max(g.count - 1, 1)) for s in scenes]
    fewer = [(image, f) for image, f, s in zip(images, fewer, scenes) if f.groups != s.groups]
    assert score(*zip(*fewer))["count"] <= 0.02
    # an object painted over in the image
    erased = []
    for s, image in zip(scenes, images):
        image = image.copy()
        p = s.objects[0]
        box = [round((v - p.size) * 64) - 1 for v in (p.x, p.y)] + [round((v + p.size) * 64) + 1 for v in (p.x, p.y)]
        ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
        erased.append(image)
    assert score(erased, scenes)["count"] <= 0.02


def test_targets_as_scene_dict_or_caption(scenes):
    image, scene = render(scenes[0], 64), scenes[0]
    assert check(image, scene) == check(image, scene.to_dict()) == check(image, caption(scene))
    assert check(image, caption(scene)).correct
    with pytest.raises(ValueError):
        check(image, "a purple elephant")


def test_image_formats(scenes):
    scene = scenes[1]
    image = render(scene, 48)
    pixels = np.asarray(image)
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, dtype=np.uint8)])
    for variant in (image, pixels, pixels / 255.0, image.convert("RGBA"), rgba, image.convert("P")):
        assert check(variant, scene).correct


def test_segment_reports_objects(scenes):
    scene = next(s for s in scenes if s.relation and s.n_objects == 3)
    image = render(scene, 64)
    objects = segment(image)
    assert len(objects) == 3
    assert sorted((o.colour, o.shape) for o in objects) == sorted(
        (scene.groups[p.group].colour, scene.groups[p.group].shape) for p in scene.objects
    )
    for o in objects:
        assert o.mask.shape == (64, 64) and o.mask.dtype == bool
        assert math.isclose(o.area, o.mask.mean())
        x0, y0, x1, y1 = o.bbox
        assert o.mask[y0:y1, x0:x1].sum() == o.mask.sum()
        # the centroid sits on a placement (triangles' mass centre is a third of r below it)
        assert min(math.dist(o.centroid, (p.x, p.y)) for p in scene.objects) < 0.07


def test_specks_are_ignored(scenes):
    rng = np.random.default_rng(1)
    for scene in scenes[:30]:
        pixels = np.asarray(render(scene, 64)).copy()
        for _ in range(5):  # lone pixels of random palette colours
            y, x = rng.integers(0, 64, 2)
            if (pixels[y, x] == 255).all():
                pixels[y, x] = list(COLOURS.values())[rng.integers(len(COLOURS))]
        assert check(pixels, scene).correct


def test_touching_objects_are_split():
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[20:40, 10:30] = COLOURS["red"]
    pixels[20:40, 30:50] = COLOURS["blue"]  # shares an edge with the red square
    objects = sorted(segment(pixels), key=lambda o: o.centroid[0])
    assert [(o.colour, o.shape) for o in objects] == [("red", "square"), ("blue", "square")]
    assert check(pixels, "a small red square left of a small blue square").correct


def test_check_result_and_score_without_relations(scenes):
    result = CheckResult(colour=True, shape=True, count=True, position=None)
    assert result.correct and result.to_dict() == {
        "colour": True, "shape": True, "count": True, "position": None, "correct": True
    }
    assert not CheckResult(True, True, True, False).correct
    single = [s for s in scenes if s.relation is None][:10]
    summary = score([render(s, 32) for s in single], single)
    assert math.isnan(summary["position"]) and summary["overall"] == 1.0 and summary["n_position"] == 0
    with pytest.raises(ValueError):
        score([], [])


# --- region masks for touch-ups ------------------------------------------------------------------


def _two_reds_and_a_blue() -> np.ndarray:
    """Two red circles (different sizes), a red square and a blue square on white, 64px."""
    from models.shapes import shape_mask

    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    centres = (np.arange(64) + 0.5) / 64
    xs, ys = centres[None, :], centres[:, None]
    for shape, colour, x, y, r in (("circle", "red", 0.2, 0.2, 0.12), ("circle", "red", 0.75, 0.25, 0.16),
                                   ("square", "red", 0.25, 0.75, 0.11), ("square", "blue", 0.75, 0.75, 0.12)):
        pixels[shape_mask(shape, x, y, r, xs, ys)] = COLOURS[colour]
    return pixels


def test_region_mask_is_the_union_of_the_objects_the_caption_names():
    from models.checker import region_mask

    pixels = _two_reds_and_a_blue()
    objects = segment(pixels)
    red_circles = [o for o in objects if (o.colour, o.shape) == ("red", "circle")]
    assert len(red_circles) == 2
    expected = red_circles[0].mask | red_circles[1].mask
    # no size needed; plural, article, count and case are ignored
    for cap in ("a red circle", "two red circles", "The Red Circles.", "a large red circle"):
        mask = region_mask(pixels, cap)
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert np.array_equal(mask, expected), cap
    # a colour alone or a shape alone matches on that attribute only
    reds = np.logical_or.reduce([o.mask for o in objects if o.colour == "red"])
    assert np.array_equal(region_mask(pixels, "the red one"), reds)
    squares = np.logical_or.reduce([o.mask for o in objects if o.shape == "square"])
    assert np.array_equal(region_mask(pixels, "squares", objects=objects), squares)
    # the blue square's pixels are exactly its object's, nothing else
    blue = region_mask(pixels, "a blue square")
    assert blue.sum() == (pixels == COLOURS["blue"]).all(axis=2).sum()


@pytest.mark.parametrize("cap, message", [
    ("a green triangle", r"no green triangle found .*detected: .*blue square"),
    ("a red triangle", "no red triangle found"),
    ("something shiny", "names no colour"),
    ("a red circle above a blue square", "more than one kind of object"),
])
def test_region_mask_refuses_captions_it_cannot_resolve(cap, message):
    from models.checker import region_mask

    with pytest.raises(ValueError, match=message) as err:
        region_mask(_two_reds_and_a_blue(), cap)
    assert "\n" not in str(err.value)


def test_region_mask_on_a_blank_image_says_nothing_was_detected():
    from models.checker import region_mask

    with pytest.raises(ValueError, match=r"detected: nothing"):
        region_mask(np.full((32, 32, 3), 255, np.uint8), "a red circle")


def test_region_mask_grows_by_whole_pixels_on_request():
    from scipy import ndimage

    from models.checker import region_mask

    pixels = _two_reds_and_a_blue()
    exact = region_mask(pixels, "a blue square")
    grown = region_mask(pixels, "a blue square", grow=2)
    assert np.array_equal(grown, ndimage.binary_dilation(exact, np.ones((3, 3), bool), iterations=2))
    assert (grown & ~exact).any() and not (exact & ~grown).any()
    ys, xs = np.nonzero(exact)
    gys, gxs = np.nonzero(grown)
    assert (gys.min(), gxs.min(), gys.max(), gxs.max()) == (ys.min() - 2, xs.min() - 2, ys.max() + 2, xs.max() + 2)
    with pytest.raises(ValueError, match="grow must be >= 0"):
        region_mask(pixels, "a blue square", grow=-1)
