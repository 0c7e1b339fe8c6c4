"""The built-in compositional shapes dataset: captioned scenes of coloured shapes.

A scene is one or two groups of identical shapes ("two small red circles"), and with two
groups a spatial relation between them ("... above a large blue square"). The generator is
deterministic by seed and holds some (colour, shape) pairs out of training, so the test split
measures compositional generalisation: every test scene uses at least one pair never seen in
train or val. models/checker.py reads rendered (or generated) images back and checks them.

Pure numpy + PIL: no torch, no pipeline code.

Placement keeps objects apart (OBJECT_GAP between their boxes) and inside the frame, and with
a relation puts each group on its own side of a random split line. Three large objects do not
fit on one side of a relation, so sample_scene redraws such specs and place() refuses them.

Geometry: coordinates are normalised to [0, 1] with y pointing down (image convention).
An object's `size` is its radius as a fraction of the image side: circles have that radius,
squares that half-side, triangles (apex up) that half-width and half-height. So every object
fills the axis-aligned box centre +- size, which is what the placement keeps apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

# -----------------------------------------------------------------------------
# vocabulary

# Saturated, mutually distant colours (closest pair: yellow/orange at ~96 in RGB) that are all
# far from the white background, so a nearest-colour classifier separates them under noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 40),
    "green": (30, 150, 40),
    "blue": (30, 80, 220),
    "yellow": (240, 215, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_COUNT = 3

# radius ranges (fraction of the image side); small stays >= ~6 px across at 32 px so the
# checker can still tell a circle from a square, large is clearly bigger.
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.10, 0.12), "large": (0.16, 0.19)}
OBJECT_GAP = 0.06  # min gap between objects' boxes: keeps blurred objects from touching
FRAME_MARGIN = 0.03  # min gap between an object's box and the image border
RELATION_SEPARATION = 0.15  # min centre distance along the relation axis between the groups

_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
_WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
# prefixes some prompt recipes add (XGen: "A photograph of ..."); parse_caption strips them
_CAPTION_PREFIXES = ("a photograph of ", "a photo of ", "an image of ", "a picture of ")

# -----------------------------------------------------------------------------
# scene description


@dataclass(frozen=True)
class ShapeGroup:
    colour: str
    shape: str
    size: str
    count: int

    def __post_init__(self):
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {list(SIZES)}")
        if isinstance(self.count, np.integer):
            object.__setattr__(self, "count", int(self.count))
        if not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be an integer in 1..{MAX_COUNT}, got {self.count!r}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Placement:
    group: int  # index into Scene.groups
    x: float  # centre, normalised, 0 = left
    y: float  # centre, normalised, 0 = top
    size: float  # radius as a fraction of the image side


@dataclass(frozen=True)
class Scene:
    """One group, or two groups with `relation` read as "groups[0] RELATION groups[1]".

    `objects` is empty for a spec (e.g. from parse_caption) and holds one Placement per
    object for a renderable scene.
    """

    groups: tuple[ShapeGroup, ...]
    relation: str | None = None
    objects: tuple[Placement, ...] = ()

    def __post_init__(self):
        # accept lists (e.g. from hand-written code) but store tuples so scenes stay hashable
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.groups) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 groups, got {len(self.groups)}")
        if len(self.groups) == 1 and self.relation is not None:
            raise ValueError("a single-group scene has no relation")
        if len(self.groups) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"two groups need a relation in {list(RELATIONS)}, got {self.relation!r}")
            # the checker tells the groups apart by colour or shape, so they must differ in one
            if self.groups[0].pair == self.groups[1].pair:
                raise ValueError(f"the two groups must differ in colour or shape, both are {self.groups[0].pair}")
        if self.objects:
            for p in self.objects:
                if not 0 <= p.group < len(self.groups):
                    raise ValueError(f"placement refers to group {p.group}, scene has {len(self.groups)}")
            for i, g in enumerate(self.groups):
                n = sum(p.group == i for p in self.objects)
                if n != g.count:
                    raise ValueError(f"group {i} has count {g.count} but {n} placements")

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def pairs(self) -> frozenset[tuple[str, str]]:
        return frozenset(g.pair for g in self.groups)

    def spec(self) -> Scene:
        """The same scene without placements (what a caption describes)."""
        return Scene(self.groups, self.relation)

    def to_dict(self) -> dict:
        return {
            "groups": [{"colour": g.colour, "shape": g.shape, "size": g.size, "count": g.count} for g in self.groups],
            "relation": self.relation,
            "objects": [{"group": p.group, "x": p.x, "y": p.y, "size": p.size} for p in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        try:
            groups = tuple(ShapeGroup(g["colour"], g["shape"], g["size"], int(g["count"])) for g in d["groups"])
            objects = tuple(
                Placement(int(p["group"]), float(p["x"]), float(p["y"]), float(p["size"])) for p in d.get("objects", ())
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a scene dict ({e!r}): {d!r}") from e
        return cls(groups, d.get("relation"), objects)


# -----------------------------------------------------------------------------
# captions


def _group_phrase(g: ShapeGroup) -> str:
    plural = "s" if g.count > 1 else ""
    return f"{_NUMBER_WORDS[g.count]} {g.size} {g.colour} {g.shape}{plural}"


def caption(scene: Scene) -> str:
    """Plain English: "a small red circle", "two small red circles above a large blue square"."""
    phrases = [_group_phrase(g) for g in scene.groups]
    if scene.relation is None:
        return phrases[0]
    return f"{phrases[0]} {scene.relation} {phrases[1]}"


_GRAMMAR = (
    "expected '<number> <size> <colour> <shape>' optionally followed by "
    f"'<relation> <number> <size> <colour> <shape>', with number in a/an/one/two/three, "
    f"size in {'/'.join(SIZES)}, colour in {'/'.join(COLOURS)}, shape in {'/'.join(SHAPES)} "
    f"(plural for two or three), relation in {'/'.join(RELATIONS)}"
)


def _parse_group(phrase: str, text: str) -> ShapeGroup:
    words = phrase.split()
    if len(words) == 3 and words[1] in COLOURS:
        raise ValueError(f"{phrase!r} in caption {text!r} needs a size ({' or '.join(SIZES)}) before the colour")
    if len(words) != 4:
        raise ValueError(f"cannot parse {phrase!r} in caption {text!r}: {_GRAMMAR}")
    number, size, colour, noun = words
    if number not in _WORD_NUMBERS:
        raise ValueError(f"unknown number word {number!r} in caption {text!r}: {_GRAMMAR}")
    count = _WORD_NUMBERS[number]
    shape = noun[:-1] if noun.endswith("s") else noun
    if size not in SIZES or colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"cannot parse {phrase!r} in caption {text!r}: {_GRAMMAR}")
    if (count > 1) != noun.endswith("s"):
        raise ValueError(f"number and plural disagree in {phrase!r} in caption {text!r}: {_GRAMMAR}")
    return ShapeGroup(colour, shape, size, count)


def parse_caption(text: str) -> Scene:
    """The Scene spec (no placements) a caption describes; ValueError if outside the grammar.

    Case, surrounding whitespace, a trailing period and a leading "a photograph of" (or
    "a photo of" / "an image of" / "a picture of") are ignored.
    """
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    norm = " ".join(text.lower().split()).rstrip(".").strip()
    for prefix in _CAPTION_PREFIXES:
        if norm.startswith(prefix):
            norm = norm[len(prefix) :]
            break
    # split on the relation; the vocabulary words never contain a relation phrase
    pattern = r" (" + "|".join(re.escape(r) for r in RELATIONS) + r") "
    parts = re.split(pattern, norm)
    if len(parts) == 1:
        return Scene((_parse_group(parts[0], text),))
    if len(parts) == 3:
        first, relation, second = parts
        return Scene((_parse_group(first, text), _parse_group(second, text)), relation)
    raise ValueError(f"caption {text!r} has more than one relation: {_GRAMMAR}")


# -----------------------------------------------------------------------------
# rendering


def shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` centred at (cx, cy) with radius r, sampled at points (xs, ys).

    Shared with the checker, which compares segments against these ideal shapes.
    """
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex at the top centre, base along the bottom of the box
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int) -> Image.Image:
    """RGB image of a placed scene; no anti-aliasing (hard edges the checker reads back)."""
    if not scene.objects:
        raise ValueError("scene has no placements; render a scene from sample_scene/generate or place() it first")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    # sample at pixel centres in normalised coordinates, so any resolution draws the same scene
    centres = (np.arange(image_size) + 0.5) / image_size
    xs, ys = centres[None, :], centres[:, None]
    pixels = np.empty((image_size, image_size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    for p in scene.objects:
        g = scene.groups[p.group]
        pixels[shape_mask(g.shape, p.x, p.y, p.size, xs, ys)] = COLOURS[g.colour]
    return Image.fromarray(pixels, "RGB")


# -----------------------------------------------------------------------------
# sampling


def all_pairs() -> frozenset[tuple[str, str]]:
    return frozenset((c, s) for c in COLOURS for s in SHAPES)


def split_pairs(seed: int, heldout_fraction: float) -> tuple[frozenset, frozenset]:
    """(train_pairs, heldout_pairs) of (colour, shape); every colour and shape stays in train."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    pairs = sorted(all_pairs())
    n_heldout = int(round(heldout_fraction * len(pairs)))
    if heldout_fraction > 0:
        n_heldout = max(n_heldout, 1)
    rng = np.random.default_rng([seed, 0x5A1B])  # own stream: independent of the scene streams
    train = set(pairs)
    heldout: set[tuple[str, str]] = set()
    # greedily hold out pairs in random order while every colour and shape keeps a train pair
    for i in rng.permutation(len(pairs)):
        if len(heldout) == n_heldout:
            break
        colour, shape = pairs[i]
        rest = train - {pairs[i]}
        if any(c == colour for c, _ in rest) and any(s == shape for _, s in rest):
            train, heldout = rest, heldout | {pairs[i]}
    if len(heldout) < n_heldout:
        raise ValueError(
            f"heldout_fraction {heldout_fraction} holds out too many of the {len(pairs)} (colour, shape) pairs "
            f"to keep every colour and shape in training (got {len(heldout)}); use a smaller fraction"
        )
    return frozenset(train), frozenset(heldout)


def _try_positions(
    groups: tuple[ShapeGroup, ...], relation: str | None, rng: np.random.Generator, tries: int
) -> tuple[Placement, ...] | None:
    """One rejection-sampling attempt; None as soon as an object does not fit."""
    # with a relation, a random split line on the relation axis separates the two groups
    split = rng.uniform(0.4, 0.6)
    low_side = 0 if relation in ("left of", "above") else 1  # group on the low-coordinate side
    todo = [(float(rng.uniform(*SIZE_RADIUS[g.size])), gi) for gi, g in enumerate(groups) for _ in range(g.count)]
    placed: list[Placement] = []
    for r, gi in sorted(todo, reverse=True):  # big objects first: they are the hard ones to fit
        lo, hi = r + FRAME_MARGIN, 1 - r - FRAME_MARGIN
        a_lo, a_hi = lo, hi  # range along the relation axis
        if relation is not None:
            if gi == low_side:
                a_hi = min(hi, split - RELATION_SEPARATION / 2)
            else:
                a_lo = max(lo, split + RELATION_SEPARATION / 2)
        for _ in range(tries):
            a, b = rng.uniform(a_lo, a_hi), rng.uniform(lo, hi)
            x, y = (b, a) if relation in ("above", "below") else (a, b)
            # boxes (centre +- radius) must be OBJECT_GAP apart on at least one axis
            if all(max(abs(x - q.x), abs(y - q.y)) >= r + q.size + OBJECT_GAP for q in placed):
                placed.append(Placement(gi, float(x), float(y), r))
                break
        else:
            return None
    return tuple(sorted(placed, key=lambda p: p.group))  # group order; stable within a group


def _sample_positions(
    groups: tuple[ShapeGroup, ...], relation: str | None, rng: np.random.Generator, tries: int = 50, restarts: int = 10
) -> tuple[Placement, ...] | None:
    """Random non-overlapping placements; None if the spec does not pack (after some restarts)."""
    for _ in range(restarts):
        objects = _try_positions(groups, relation, rng, tries)
        if objects is not None:
            return objects
    return None


def place(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with fresh random placements; ValueError if it cannot be packed."""
    objects = _sample_positions(scene.groups, scene.relation, rng, restarts=100)
    if objects is None:
        raise ValueError(f"cannot place {caption(scene)!r} without overlaps")
    return Scene(scene.groups, scene.relation, objects)


def _sample_group(rng: np.random.Generator, pairs: list, max_count: int) -> ShapeGroup:
    colour, shape = pairs[rng.integers(len(pairs))]
    size = SIZES[rng.integers(len(SIZES))]
    count = int(rng.integers(1, min(MAX_COUNT, max_count) + 1))
    return ShapeGroup(colour, shape, size, count)


def sample_scene(
    rng: np.random.Generator, pairs: Iterable, max_objects: int, require_pairs: Iterable | None = None
) -> Scene:
    """A random placed scene: groups use `pairs`; with `require_pairs`, one group uses one of those.

    Half the scenes (when max_objects >= 2) have two groups and a relation; total objects
    <= max_objects. Specs that do not pack into the frame are redrawn.
    """
    pairs = sorted(pairs)
    required = sorted(require_pairs) if require_pairs is not None else None
    if not pairs and not required:
        raise ValueError("no (colour, shape) pairs to sample from")
    if required is not None and not required:
        raise ValueError("require_pairs is empty")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    # decide the layout once, so redrawn specs do not tilt the one/two-group mix
    two = max_objects >= 2 and rng.random() < 0.5
    for attempt in range(1000):
        if attempt == 100:
            two = False  # two groups never came out valid (e.g. a single pair to draw from)
        if not two:
            group = _sample_group(rng, required or pairs, max_objects)
            groups, relation = (group,), None
        else:
            # the required group (if any) goes to a random side of the relation
            required_index = int(rng.integers(2))
            pools = [pairs, pairs]
            if required:
                pools[required_index] = required
            if not pools[0] or not pools[1]:
                continue  # e.g. require_pairs given but pairs empty: only single groups possible
            g0 = _sample_group(rng, pools[0], max_objects - 1)
            g1 = _sample_group(rng, pools[1], max_objects - g0.count)
            if g0.pair == g1.pair:
                continue  # the checker tells groups apart by colour or shape
            groups, relation = (g0, g1), RELATIONS[rng.integers(len(RELATIONS))]
        objects = _sample_positions(groups, relation, rng)
        if objects is not None:
            return Scene(groups, relation, objects)
    raise RuntimeError(f"could not sample a scene that packs into the frame with max_objects={max_objects}")


SPLITS = ("train", "val", "test")


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One stream per item: a scene depends only on (seed, split, index), not on split sizes."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def generate(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    image_size: int,
    max_objects: int,
    heldout_fraction: float,
) -> Iterator[tuple[str, int, Scene]]:
    """Yield (split, index_within_split, scene), train then val then test, deterministic by seed.

    Train and val use only the train (colour, shape) pairs; every test scene has at least one
    held-out pair (with heldout_fraction 0 the test split is drawn like train). Render with
    render(scene, image_size); image_size is only validated here.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for shapes to stay recognisable, got {image_size}")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    train_pairs, heldout_pairs = split_pairs(seed, heldout_fraction)
    return _generate(seed, (n_train, n_val, n_test), max_objects, train_pairs, heldout_pairs)


def _generate(seed, sizes, max_objects, train_pairs, heldout_pairs) -> Iterator[tuple[str, int, Scene]]:
    # a separate generator function so that generate() validates its arguments when called
    n_train, n_val, n_test = sizes
    plan = (
        ("train", n_train, train_pairs, None),
        ("val", n_val, train_pairs, None),
        ("test", n_test, train_pairs | heldout_pairs, heldout_pairs or None),
    )
    for split, n, pairs, required in plan:
        for index in range(n):
            yield split, index, sample_scene(scene_rng(seed, split, index), pairs, max_objects, required)
