"""Exact checker for the shapes dataset: does an image show what its caption says?

segment() reads an image back into objects. A pixel is foreground when it is nearer to a
palette colour than to the white background (so a blurred edge counts up to half coverage and
outlines keep their shape); foreground components smaller than MIN_AREA_FRACTION of the image
are specks and ignored. A component's colour is the majority among its confidently coloured
pixels (within COLOUR_TOLERANCE of a palette colour); a component holding two colours in
substance (touching objects) is split between them. An object's shape is whichever ideal
shape (models.shapes.shape_mask), fitted to the object's moments, overlaps it best; both are
weighed by sub-pixel coverage (how much of each pixel the object covers, read from its colour), so
a small square whose edges fall mid-pixel keeps its quarter-covered corners.
region_mask() picks the objects a region caption ("a red circle") names, for touch-ups.

check() compares the objects with the target scene per category. Objects are first assigned
to groups: with one group every object belongs to it; with two, an object scores 2 for a group
of its colour plus 1 for a group of its shape and joins the higher-scoring group (colour is the
most reliable reading, so a misread shape does not drag an object into the other group); on a
tie (it matches neither group's distinguishing attribute) it stays unassigned. Then:

- colour:   the set of object colours equals the set of requested colours, and every
            assigned object has its group's colour.
- shape:    every group has an object, every assigned object has its group's shape and every
            unassigned one has one of the requested shapes. A swapped binding ("a blue circle
            and a red square" for "a red circle ... a blue square") fails here.
- count:    every group has exactly its count of objects, and no object is unassigned.
- position: (only with a relation, else None) the mean centroid of group 0's objects lies on
            the stated side of group 1's by more than POSITION_MARGIN along that axis.

Sizes are not checked. The categories stay independent where the image allows it: recolouring
every shape fails colour, while shape, count and position are still judged (count can only
fail too when the two groups have the same shape and differ only in the lost colours).

Pure numpy + scipy + PIL, any image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from models.shapes import BACKGROUND, COLOURS, SHAPES, Scene, parse_caption, shape_mask

COLOUR_TOLERANCE = 90.0  # max RGB distance to a palette colour for a pixel to vote on colour
FOREGROUND_TOLERANCE = 150.0  # pixels farther than this from every colour (e.g. black) are background
MIN_AREA_FRACTION = 0.003  # components smaller than this share of the image are specks
MIN_AREA_PIXELS = 3
POSITION_MARGIN = 0.02  # normalised; group centroids closer than this on the axis fail position

_COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([BACKGROUND] + [COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # small triangles' apexes touch only diagonally
SUBSAMPLES = 4  # per pixel and axis, when drawing an ideal shape's area coverage


@dataclass(eq=False)
class DetectedObject:
    colour: str
    shape: str
    centroid: tuple[float, float]  # (x, y), normalised to [0, 1], y down
    area: float  # fraction of the image
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end exclusive
    mask: np.ndarray  # bool HxW, same size as the input image


@dataclass(frozen=True)
class CheckResult:
    colour: bool
    shape: bool
    count: bool
    position: bool | None  # None when the target has no relation

    @property
    def correct(self) -> bool:
        return self.colour and self.shape and self.count and self.position is not False

    def to_dict(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": self.count,
            "position": self.position,
            "correct": self.correct,
        }


# -----------------------------------------------------------------------------
# segmentation


def _as_rgb_array(image) -> np.ndarray:
    """HxWx3 float32 in 0..255 from a PIL image or a uint8 / float (0..1) array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image array, got shape {pixels.shape}")
    pixels = pixels[:, :, :3]
    if np.issubdtype(pixels.dtype, np.floating) and pixels.max(initial=0) <= 1.0:
        pixels = pixels * 255.0  # float images in [0, 1]
    return pixels.astype(np.float32)


def _classify_pixels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, core) masks from the nearest of background + palette colours.

    foreground: nearer to a palette colour than to the background, so a blurred edge belongs to
    the object up to half coverage and shapes keep their outline. core: palette index k >= 1
    where the pixel is within COLOUR_TOLERANCE of colour k (else 0); only core pixels vote on
    an object's colour, so edge blends that happen to be nearest another colour do not count.
    """
    flat = pixels.reshape(-1, 3)
    # squared distances to every palette colour in one matrix product: |p|^2 - 2 p.c + |c|^2
    dist2 = np.einsum("ij,ij->i", flat, flat)[:, None] - 2 * flat @ _PALETTE.T + (_PALETTE**2).sum(axis=1)
    nearest = dist2.argmin(axis=1).reshape(pixels.shape[:2])
    best = np.sqrt(np.maximum(dist2.min(axis=1), 0)).reshape(pixels.shape[:2])
    foreground = (nearest > 0) & (best <= FOREGROUND_TOLERANCE)
    core = np.where(foreground & (best <= COLOUR_TOLERANCE), nearest, 0).astype(np.int8)
    return foreground, core


def _split_by_colour(region: np.ndarray, core: np.ndarray, min_area: float) -> list[tuple[int, np.ndarray]]:
    """(palette index, mask) per object in one foreground component.

    Usually one colour owns the component. If several colours each hold a substantial share of
    its core pixels (touching objects, as generated images may have), every pixel goes to the
    colour of its nearest core pixel and each colour's connected pieces are separate objects.
    """
    counts = np.bincount(core[region], minlength=len(_PALETTE))
    counts[0] = 0
    colours = [k for k in np.flatnonzero(counts) if counts[k] >= max(min_area, 0.25 * counts.max())]
    if len(colours) <= 1:
        return [(colours[0], region)] if colours else []
    seeds = region & np.isin(core, colours)
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    owner = core[iy, ix]
    parts = []
    for k in colours:
        pieces, n = ndimage.label(region & (owner == k), structure=_EIGHT_CONNECTED)
        parts += [(k, pieces == i) for i in range(1, n + 1) if (pieces == i).sum() >= min_area]
    return parts


def _fitted_shapes(cx: float, cy: float, sx: float, sy: float) -> dict[str, tuple[float, float, float, float]]:
    """Per candidate shape, the (cx, cy, rx, ry) that give it this mean (cx, cy) and spread (sx, sy).

    Fitting by moments rather than to the bounding box keeps sub-pixel position and size, which
    matters at 32 px where a circle's box can be a pixel narrower than its diameter. One entry
    per shape in models.shapes.SHAPES (plus a downward triangle, which generators may draw).
    """
    # triangle (apex up, half-height h): var_y = 2h^2/9, var_x = r^2/6, mass centre h/3 below box centre
    hy = 3 * sy / np.sqrt(2)
    return {  # square first: tiny squares and circles can raster alike, ties go to the first
        "square": (cx, cy, np.sqrt(3) * sx, np.sqrt(3) * sy),  # uniform on [-r, r]: var = r^2/3
        "circle": (cx, cy, 2 * sx, 2 * sy),  # uniform disc: var = r^2/4
        "triangle": (cx, cy - hy / 3, np.sqrt(6) * sx, hy),
        "inverted triangle": (cx, cy + hy / 3, np.sqrt(6) * sx, hy),
    }


def _template_coverage(name: str, fit: tuple[float, float, float, float], h: int, w: int) -> np.ndarray:
    """float HxW: the share of each pixel the fitted ideal shape covers (SUBSAMPLES^2 points per pixel)."""
    cx, cy, rx, ry = fit
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    grid_x = (np.arange(w)[:, None] + offsets[None, :]).reshape(1, -1)  # [1, W*S]
    grid_y = (np.arange(h)[:, None] + offsets[None, :]).reshape(-1, 1)  # [H*S, 1]
    # draw the unit shape in coordinates scaled so its radius is 1 on both axes
    flip = -1.0 if name == "inverted triangle" else 1.0
    inside = shape_mask("triangle" if "triangle" in name else name, 0.0, 0.0, 1.0, (grid_x - cx) / rx, flip * (grid_y - cy) / ry)
    return inside.reshape(h, SUBSAMPLES, w, SUBSAMPLES).mean(axis=(1, 3))


def classify_shape(mask: np.ndarray, coverage: np.ndarray | None = None) -> str:
    """Name of the ideal shape, fitted to the object's moments, that overlaps it best (soft IoU).

    `coverage`: float HxW in [0, 1], the share of each pixel the object covers (segment() reads it
    from the pixel colours; default: the mask itself). Moments and overlap are weighted by it and
    the ideal shapes are drawn with area coverage, so a square whose edges fall mid-pixel (a 64 px
    image box-filtered to 32 px) keeps its corners instead of rounding into a circle.
    """
    # the mask's own pixels count at least half (foreground, or a hole that noise punched into it)
    coverage = mask.astype(np.float32) if coverage is None else np.where(mask, np.maximum(coverage, 0.5), coverage)
    ys, xs = np.nonzero(coverage > 0)
    y0, x0 = ys.min() - 2, xs.min() - 2  # a margin: a fitted shape may reach past the object
    h, w = ys.max() - y0 + 3, xs.max() - x0 + 3
    crop = np.zeros((h, w), dtype=np.float32)
    crop[ys - y0, xs - x0] = coverage[ys, xs]
    # moments at pixel centres; + 1/12: the spread of a pixel's own area, which centres leave out
    weight = crop / crop.sum()
    centres_x, centres_y = np.arange(w)[None, :] + 0.5, np.arange(h)[:, None] + 0.5
    cx, cy = (weight * centres_x).sum(), (weight * centres_y).sum()
    sx = np.sqrt((weight * (centres_x - cx) ** 2).sum() + 1 / 12)
    sy = np.sqrt((weight * (centres_y - cy) ** 2).sum() + 1 / 12)
    best, best_iou = "square", -1.0
    for name, fit in _fitted_shapes(cx, cy, sx, sy).items():
        template = _template_coverage(name, fit, h, w)
        iou = np.minimum(crop, template).sum() / np.maximum(crop, template).sum()
        if iou > best_iou:
            best, best_iou = name, iou
    return "triangle" if best == "inverted triangle" else best


def _coverage(pixels: np.ndarray, colour_index: int, mask: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """float HxW: how much of each pixel an object of palette colour `colour_index` covers.

    A pixel blending the object's colour with the background lies on the line between them; its
    position along that line is the covered share. Read on the object's mask and the one-pixel
    ring around it that no other object claims: a box-filtered corner covers a quarter of its
    pixel, below the half that makes it foreground, yet it is what tells a square from a circle.
    """
    background, colour = _PALETTE[0], _PALETTE[colour_index]
    direction = colour - background
    share = np.clip((pixels - background) @ direction / (direction @ direction), 0.0, 1.0)
    ring = ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED) & ~foreground
    return np.where(mask | ring, share, 0.0).astype(np.float32)


def segment(image) -> list[DetectedObject]:
    """Objects in an image: foreground components split by palette colour, with shape and centroid."""
    pixels = _as_rgb_array(image)
    h, w = pixels.shape[:2]
    foreground, core = _classify_pixels(pixels)
    min_area = max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * h * w)
    # noise can punch holes into an object; holes would distort its shape and area
    components, _ = ndimage.label(ndimage.binary_fill_holes(foreground), structure=_EIGHT_CONNECTED)
    objects = []
    for i, box in enumerate(ndimage.find_objects(components), start=1):
        region = components[box] == i
        if region.sum() < min_area:
            continue  # a speck
        for k, part in _split_by_colour(region, core[box], min_area):
            mask = np.zeros((h, w), dtype=bool)
            mask[box] = part
            # the box and the one-pixel ring _coverage reads around it: shape work stays per object
            window = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            ys, xs = np.nonzero(mask)
            objects.append(
                DetectedObject(
                    colour=_COLOUR_NAMES[k - 1],
                    shape=classify_shape(mask[window], _coverage(pixels[window], k, mask[window], foreground[window])),
                    centroid=(float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)),
                    area=len(xs) / (h * w),
                    bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                    mask=mask,
                )
            )
    return objects


def region_mask(image, caption: str, objects: list[DetectedObject] | None = None, grow: int = 0) -> np.ndarray:
    """bool HxW: the union of the segmented objects whose colour and shape a region caption names.

    The caption is one kind of object ("a red circle", "the two red circles", "blue squares", "red");
    sizes, counts and articles are ignored, and a caption naming only a colour or only a shape matches
    on that alone. ValueError (one line) when it names no colour or shape, names two of one (a relation
    caption: touch up one group at a time), or no detected object matches (the message lists what was
    found). `objects`: segment(image) when already computed. `grow`: dilate the mask by this many
    pixels (8-connected): objects end at half coverage, so a touch-up that must also replace an
    object's blurred fringe needs a margin.
    """
    words = [w.rstrip(".,;") for w in caption.lower().split()]
    colours = sorted({w for w in words if w in COLOURS})
    shapes = sorted({w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
                     for w in words if w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES)})
    if not colours and not shapes:
        raise ValueError(f"region caption {caption!r} names no colour ({'/'.join(COLOURS)}) or shape "
                         f"({'/'.join(SHAPES)})")
    if len(colours) > 1 or len(shapes) > 1:
        raise ValueError(f"region caption {caption!r} names more than one kind of object "
                         f"({', '.join(colours + shapes)}); touch up one at a time")
    objects = segment(image) if objects is None else objects
    matching = [o for o in objects if (not colours or o.colour == colours[0]) and (not shapes or o.shape == shapes[0])]
    if not matching:
        found = ", ".join(f"{o.colour} {o.shape}" for o in objects) or "nothing"
        raise ValueError(f"no {' '.join(colours + shapes)} found in the image for region caption {caption!r} "
                         f"(detected: {found})")
    mask = np.logical_or.reduce([o.mask for o in matching])
    if grow < 0:
        raise ValueError(f"region grow must be >= 0 pixels, got {grow}")
    return ndimage.binary_dilation(mask, structure=_EIGHT_CONNECTED, iterations=grow) if grow else mask


# -----------------------------------------------------------------------------
# checking


def _as_scene(target) -> Scene:
    if isinstance(target, Scene):
        return target
    if isinstance(target, str):
        return parse_caption(target)
    if isinstance(target, dict):
        return Scene.from_dict(target)
    raise TypeError(f"target must be a Scene, a scene dict or a caption, got {type(target).__name__}")


def _assign(objects: list[DetectedObject], scene: Scene) -> list[int | None]:
    """Group index per object (see module docstring), None when it matches two groups equally."""
    if len(scene.groups) == 1:
        return [0] * len(objects)
    assignment = []
    for o in objects:
        scores = [2 * (o.colour == g.colour) + (o.shape == g.shape) for g in scene.groups]
        assignment.append(None if scores[0] == scores[1] else int(np.argmax(scores)))
    return assignment


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Does point a lie `relation` point b (y grows downwards)?"""
    (ax, ay), (bx, by) = a, b
    if relation == "left of":
        return bool(ax < bx - POSITION_MARGIN)
    if relation == "right of":
        return bool(ax > bx + POSITION_MARGIN)
    if relation == "above":
        return bool(ay < by - POSITION_MARGIN)
    if relation == "below":
        return bool(ay > by + POSITION_MARGIN)
    raise ValueError(f"unknown relation {relation!r}")


def check_objects(objects: list[DetectedObject], target) -> CheckResult:
    """check() on already segmented objects (lets callers segment once and check many targets)."""
    scene = _as_scene(target)
    groups = scene.groups
    assignment = _assign(objects, scene)
    members = [[o for o, a in zip(objects, assignment) if a == gi] for gi in range(len(groups))]
    unassigned = [o for o, a in zip(objects, assignment) if a is None]

    colour = {o.colour for o in objects} == {g.colour for g in groups} and all(
        o.colour == g.colour for g, group_objects in zip(groups, members) for o in group_objects
    )
    shape = (
        all(members)
        and all(o.shape == g.shape for g, group_objects in zip(groups, members) for o in group_objects)
        and all(o.shape in {g.shape for g in groups} for o in unassigned)
    )
    count = not unassigned and all(len(m) == g.count for g, m in zip(groups, members))
    position = None
    if scene.relation is not None:
        position = bool(members[0] and members[1]) and _relation_holds(
            scene.relation,
            tuple(np.mean([o.centroid for o in members[0]], axis=0)),
            tuple(np.mean([o.centroid for o in members[1]], axis=0)),
        )
    return CheckResult(colour=bool(colour), shape=bool(shape), count=bool(count), position=position)


def check(image, target) -> CheckResult:
    """Per-category verdict for one image against a Scene, a scene dict or a caption."""
    return check_objects(segment(image), target)


def score(images: Iterable, targets: Iterable) -> dict[str, float]:
    """Accuracy per category and overall; position over the targets that have a relation.

    Also returns n (items) and n_position (items with a relation); position is NaN when no
    target has a relation.
    """
    results = [check(image, target) for image, target in zip(images, targets, strict=True)]
    if not results:
        raise ValueError("score() needs at least one image")
    positional = [r.position for r in results if r.position is not None]
    return {
        "colour": float(np.mean([r.colour for r in results])),
        "shape": float(np.mean([r.shape for r in results])),
        "count": float(np.mean([r.count for r in results])),
        "position": float(np.mean(positional)) if positional else float("nan"),
        "overall": float(np.mean([r.correct for r in results])),
        "n": float(len(results)),
        "n_position": float(len(positional)),
    }
