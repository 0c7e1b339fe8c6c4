"""The built-in shapes dataset generator: determinism, captions, splits, rendering."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from models.shapes import (
    BACKGROUND,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Placement,
    Scene,
    ShapeGroup,
    all_pairs,
    caption,
    generate,
    parse_caption,
    place,
    render,
    sample_scene,
    shape_mask,
    split_pairs,
)

SEED, MAX_OBJECTS, HELDOUT = 0, 3, 0.2


@pytest.fixture(scope="module")
def items():
    return list(generate(SEED, 300, 50, 150, image_size=32, max_objects=MAX_OBJECTS, heldout_fraction=HELDOUT))


def _scenes(items, split=None):
    return [s for sp, _, s in items if split is None or sp == split]


def test_vocabulary():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert SIZES == ("small", "large")
    assert RELATIONS == ("left of", "right of", "above", "below")
    assert len(COLOURS) >= 5 and BACKGROUND not in COLOURS.values()
    colours = np.array(list(COLOURS.values()) + [BACKGROUND], dtype=float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert distances[~np.eye(len(colours), dtype=bool)].min() > 80  # separable by the checker


def test_generate_is_deterministic(items):
    again = list(generate(SEED, 300, 50, 150, 32, MAX_OBJECTS, HELDOUT))
    assert again == items
    for (_, _, a), (_, _, b) in zip(items[:20], again[:20]):
        assert np.array_equal(np.asarray(render(a, 32)), np.asarray(render(b, 32)))
    other = list(generate(SEED + 1, 300, 50, 150, 32, MAX_OBJECTS, HELDOUT))
    assert [s for *_, s in other] != [s for *_, s in items]
    assert not np.array_equal(np.asarray(render(other[0][2], 32)), np.asarray(render(items[0][2], 32)))


def test_scene_depends_only_on_seed_split_and_index(items):
    # growing one split must not reshuffle the others (each item has its own random stream)
    small = list(generate(SEED, 10, 5, 5, 32, MAX_OBJECTS, HELDOUT))
    lookup = {(sp, i): s for sp, i, s in items}
    assert all(lookup[(sp, i)] == s for sp, i, s in small)


def test_splits_and_indices(items):
    for split, n in (("train", 300), ("val", 50), ("test", 150)):
        assert [i for sp, i, _ in items if sp == split] == list(range(n))


def test_captions_parse_back(items):
    for scene in _scenes(items):
        spec = parse_caption(caption(scene))
        assert spec == scene.spec() and spec.objects == ()
        assert (spec.groups, spec.relation) == (scene.groups, scene.relation)


def test_caption_grammar_examples():
    scene = parse_caption("two small red circles above a large blue square")
    assert scene == Scene((ShapeGroup("red", "circle", "small", 2), ShapeGroup("blue", "square", "large", 1)), "above")
    assert caption(scene) == "two small red circles above a large blue square"
    assert caption(parse_caption("a small red circle")) == "a small red circle"
    # case, spacing, a final period and a photo prefix are tolerated
    assert parse_caption("  A photograph of Three LARGE green triangles right of one small orange circle. ") == Scene(
        (ShapeGroup("green", "triangle", "large", 3), ShapeGroup("orange", "circle", "small", 1)), "right of"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "cannot parse"),
        ("a red circle", "needs a size"),
        ("two small red circles above a blue square", "needs a size"),
        ("four small red circles", "number word"),
        ("a small pink circle", "cannot parse"),
        ("a small red hexagon", "cannot parse"),
        ("two small red circle", "plural"),
        ("a small red circles", "plural"),
        ("a small red circle near a large blue square", "cannot parse"),
        ("a small red circle above a large blue square below a small green triangle", "more than one relation"),
        ("a small red circle above a small red circle", "differ in colour or shape"),
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text, message):
    with pytest.raises(ValueError, match=message):
        parse_caption(text)


def test_counts_relations_and_group_mix(items):
    scenes = _scenes(items)
    assert {g.count for s in scenes for g in s.groups} == {1, 2, 3}
    assert {s.relation for s in scenes if s.relation} == set(RELATIONS)
    assert {g.size for s in scenes for g in s.groups} == set(SIZES)
    assert all(s.n_objects <= MAX_OBJECTS for s in scenes)
    single = sum(len(s.groups) == 1 for s in scenes) / len(scenes)
    assert 0.35 < single < 0.65
    for s in scenes:
        assert (s.relation is None) == (len(s.groups) == 1)
        assert Counter(p.group for p in s.objects) == {i: g.count for i, g in enumerate(s.groups)}


def test_heldout_pairs_only_in_test(items):
    train_pairs, heldout = split_pairs(SEED, HELDOUT)
    assert heldout and not (train_pairs & heldout) and train_pairs | heldout == all_pairs()
    for scene in _scenes(items, "train") + _scenes(items, "val"):
        assert scene.pairs <= train_pairs
    for scene in _scenes(items, "test"):
        assert scene.pairs & heldout
    # every colour and every shape is still seen in training, only their combinations are new
    seen = set().union(*(s.pairs for s in _scenes(items, "train")))
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_split_pairs(fraction):
    train, heldout = split_pairs(3, fraction)
    assert heldout and len(heldout) == max(1, round(fraction * len(all_pairs())))
    assert {c for c, _ in train} == set(COLOURS) and {s for _, s in train} == set(SHAPES)
    assert split_pairs(3, fraction) == (train, heldout)
    assert split_pairs(0, 0.0) == (all_pairs(), frozenset())
    assert any(split_pairs(seed, 0.3)[1] != split_pairs(0, 0.3)[1] for seed in range(1, 5))


def test_split_pairs_refuses_impossible_fractions():
    with pytest.raises(ValueError, match="smaller fraction"):
        split_pairs(0, 0.9)
    with pytest.raises(ValueError):
        split_pairs(0, 1.0)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_render_size_mode_and_palette(items, size):
    for scene in _scenes(items)[:10]:
        image = render(scene, size)
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (size, size)
        colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
        assert colours == {BACKGROUND} | {COLOURS[g.colour] for g in scene.groups}  # no anti-aliasing


def test_objects_inside_frame_and_apart(items):
    size = 64
    centres = (np.arange(size) + 0.5) / size
    for scene in _scenes(items):
        for p in scene.objects:
            assert 0 < p.x - p.size and p.x + p.size < 1 and 0 < p.y - p.size and p.y + p.size < 1
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:  # boxes are apart on at least one axis
                assert max(abs(a.x - b.x) - a.size - b.size, abs(a.y - b.y) - a.size - b.size) > 0.05
        masks = [
            shape_mask(scene.groups[p.group].shape, p.x, p.y, p.size, centres[None], centres[:, None])
            for p in scene.objects
        ]
        assert all(m.any() for m in masks)
        assert (np.sum(masks, axis=0) <= 1).all()  # drawn pixels never overlap


def test_relation_holds_for_every_object(items):
    for scene in _scenes(items):
        if scene.relation is None:
            continue
        first = [p for p in scene.objects if p.group == 0]
        second = [p for p in scene.objects if p.group == 1]
        for a in first:
            for b in second:
                assert {
                    "left of": a.x < b.x,
                    "right of": a.x > b.x,
                    "above": a.y < b.y,
                    "below": a.y > b.y,
                }[scene.relation]


def test_scene_dict_round_trip(items):
    for scene in _scenes(items)[:50]:
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    with pytest.raises(ValueError, match="not a scene dict"):
        Scene.from_dict({"relation": None})


def test_scene_validation():
    red_circle = ShapeGroup("red", "circle", "small", 1)
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeGroup("pink", "circle", "small", 1)
    with pytest.raises(ValueError, match="count"):
        ShapeGroup("red", "circle", "small", 4)
    with pytest.raises(ValueError, match="no relation"):
        Scene((red_circle,), "above")
    with pytest.raises(ValueError, match="need a relation"):
        Scene((red_circle, ShapeGroup("blue", "circle", "small", 1)))
    with pytest.raises(ValueError, match="placements"):
        Scene((red_circle,), None, (Placement(0, 0.5, 0.5, 0.1), Placement(0, 0.2, 0.2, 0.1)))
    with pytest.raises(ValueError, match="no placements"):
        render(Scene((red_circle,)), 32)


def test_generate_validates_arguments_when_called():
    with pytest.raises(ValueError, match="image_size"):
        generate(0, 1, 1, 1, image_size=8, max_objects=3, heldout_fraction=0.2)
    with pytest.raises(ValueError, match="n_val"):
        generate(0, 1, -1, 1, image_size=32, max_objects=3, heldout_fraction=0.2)
    with pytest.raises(ValueError, match="max_objects"):
        generate(0, 1, 1, 1, image_size=32, max_objects=0, heldout_fraction=0.2)


def test_sample_scene_options():
    rng = np.random.default_rng(0)
    required = {("purple", "triangle")}
    for _ in range(50):
        scene = sample_scene(rng, all_pairs(), 6, require_pairs=required)
        assert scene.pairs & required and scene.n_objects <= 6
        assert sample_scene(rng, all_pairs(), 1).n_objects == 1
    with pytest.raises(ValueError):
        sample_scene(rng, all_pairs(), 0)


def test_place_a_parsed_caption():
    spec = parse_caption("three small blue squares below two large red triangles")
    scene = place(spec, np.random.default_rng(0))
    assert scene.spec() == spec and len(scene.objects) == 5
    assert render(scene, 64).size == (64, 64)
    with pytest.raises(ValueError, match="cannot place"):  # three large objects overflow one side
        place(parse_caption("three large blue squares below a small red circle"), np.random.default_rng(0))
