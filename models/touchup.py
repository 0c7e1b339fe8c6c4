"""Region touch-ups (XGen-Image-1): segment, crop, expand, img2img, blend.

    image [3,H,W] in [-1,1], region [H,W] bool
      --bounding box of the region, grown by `expand` x its side on each edge, made square and
        clamped to the image--> crop [3,S,S]
      --resize to the cascade's resolution R--> [1,3,R,R]
      --cascade.img2img([caption], crop, strength, seed)--> [1,3,R,R]
      --resize back to S--> [3,S,S]
      --blend through the region mask feathered inward by `feather` pixels--> image [3,H,W]

The crop gives the generator the object at its own working resolution with some context around it,
so a small object gets all of the model's pixels. The blend weight is 0 outside the region, so every
pixel outside it is exactly the input's; the feather only softens the region's inner edge.

Region masks come from the exact checker (models.checker.region_mask) on the shapes data, or from a
user-supplied segmenter (load_segmenter: a `module:function` taking (uint8 HxWx3, caption)).
Pure torch (+ importlib for the segmenter); works with either cascade family through img2img.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# segment(image uint8 [H,W,3], caption) -> bool [H,W]
Segmenter = Callable[[np.ndarray, str], np.ndarray]


def crop_box(region: Tensor, expand: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop: the region's bounding box grown by `expand` x its longer side
    on each edge, centred on the box, shifted (then shrunk) to stay inside the image."""
    if region.ndim != 2:
        raise ValueError(f"region mask must be [H, W], got {list(region.shape)}")
    if not math.isfinite(expand) or expand < 0:
        raise ValueError(f"touch-up expand must be a number >= 0, got {expand}")
    if not region.any():
        raise ValueError("the touch-up region is empty: the mask selects no pixel")
    H, W = region.shape
    ys, xs = torch.nonzero(region, as_tuple=True)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1  # end exclusive
    side = min(math.ceil(max(x1 - x0, y1 - y0) * (1 + 2 * expand)), H, W)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(round(cx - side / 2), 0), W - side)
    top = min(max(round(cy - side / 2), 0), H - side)
    return left, top, side


def feathered(region: Tensor, feather: int) -> Tensor:
    """[H,W] float blend weight: 0 outside the region, rising linearly over `feather` pixels inside it to 1.

    A (2f+1) box blur of the mask is (f+1+d)/(2f+1) at depth d inside a straight edge, so 2*blur - 1
    ramps from 1/(2f+1) at the edge pixel to 1 at depth f; multiplying by the mask keeps it 0 outside.
    Regions too thin for that get the widest feather that still leaves some pixel at weight 1."""
    if not isinstance(feather, int) or feather < 0:
        raise ValueError(f"touch-up feather must be an integer >= 0 (pixels), got {feather!r}")
    mask = region.float()
    # a region thinner than 2f+1 would never reach weight 1 (or vanish): narrow the feather until its core does
    for f in range(feather, 0, -1):
        # replicate padding: the image border is not a region edge, so it is not feathered
        blur = F.avg_pool2d(F.pad(mask[None, None], (f,) * 4, mode="replicate"), 2 * f + 1, stride=1)[0, 0]
        weight = (2 * blur - 1).clamp(0, 1) * mask
        if weight.max() >= 1 - 1e-6:
            return weight
    return mask


def _resize(images: Tensor, side: int) -> Tensor:
    """[B,3,h,w] -> [B,3,side,side]; antialiased, so shrinking does not alias."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def touch_up(image: Tensor, region: Tensor, caption: str, cascade, expand: float = 0.5, strength: float = 0.6,
             feather: int = 2, seed: int = 0) -> Tensor:
    """The image [3,H,W] in [-1,1] with `region` [H,W] bool re-generated under `caption` (module docstring).

    cascade: anything with `resolution` and `img2img(prompts, images [B,3,R,R], strength, seed)`."""
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"touch-up image must be float [3, H, W] in [-1, 1], got {image.dtype} {list(image.shape)}")
    if region.shape != image.shape[1:]:
        raise ValueError(f"touch-up region mask is {list(region.shape)}, the image is {list(image.shape[1:])}")
    region = region.bool().to(image.device)
    x0, y0, side = crop_box(region, expand)
    weight = feathered(region, feather)  # [H,W]
    crop = image[:, y0:y0 + side, x0:x0 + side]  # [3,S,S]
    R = cascade.resolution
    redone = cascade.img2img([caption], _resize(crop[None], R).clamp(-1, 1), strength, seed)  # [1,3,R,R]
    redone = _resize(redone.to(image.device, image.dtype), side)[0].clamp(-1, 1)  # [3,S,S]
    w = weight[y0:y0 + side, x0:x0 + side][None]  # [1,S,S]
    out = image.clone()
    # the region lies inside the crop (the box only grows), so outside the crop the weight is 0 already
    out[:, y0:y0 + side, x0:x0 + side] = torch.where(w > 0, w * redone + (1 - w) * crop, crop)
    return out


def load_segmenter(spec: str) -> Segmenter:
    """The `module:function` a user names as the touch-up segmenter; one-line ValueErrors."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"segmenter {spec!r}: expected 'module:function', e.g. 'mypkg.seg:segment'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the module raises at import
        raise ValueError(f"segmenter {spec!r}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"segmenter {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def segment_region(segmenter: Segmenter, image: np.ndarray, caption: str) -> np.ndarray:
    """segmenter(image uint8 [H,W,3], caption) checked to be a non-empty bool-like [H,W] mask."""
    mask = np.asarray(segmenter(image, caption))
    if mask.shape != image.shape[:2]:
        raise ValueError(f"the segmenter returned a mask of shape {list(mask.shape)} for an image of "
                         f"{list(image.shape[:2])}; expected [H, W]")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
        raise ValueError(f"the segmenter returned a {mask.dtype} mask; expected bool [H, W]")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(f"the segmenter found no region for {caption!r}")
    return mask
