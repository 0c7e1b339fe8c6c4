"""The domain evaluator: a small image tower aligned contrastively to the frozen text encoder.

No Inception or CLIP weights exist on a fresh machine, so the pipeline trains its own yardstick on
the training split (DESIGN.md, "a domain evaluator network"):

    images [B,3,H,W] in [0,1] --resize--> [B,3,R,R] --conv tower--> pooled [B,C]   (FID features)
                                                      --linear--> image_emb [B,E] (unit norm)
    text [B,L,D], mask [B,L] --masked mean--> [B,D] --MLP--> text_emb [B,E]      (unit norm)
    clip_score = 100 * max(cos(image_emb, text_emb), 0)                          (torchmetrics CLIPScore)

The text side reads the same frozen per-token features the generators are conditioned on, so only
a small head is trained there. Our own network because nothing in diffusers/transformers is an
image tower this small that needs no pretrained weights. Saved as safetensors + JSON (models.weights).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.weights import directory_digest, load_saved, read_meta, save_module, spec_from_dict

FORMAT = "cascade-evaluator"
FORMAT_VERSION = 1
WEIGHTS_FILE = "evaluator.safetensors"
SPEC_FILE = "evaluator.json"
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature
LOGIT_SCALE_MAX = 100.0  # CLIP clamps exp(logit_scale) here so training stays stable


@dataclass(frozen=True)
class EvaluatorSpec:
    """Typed architecture; saved next to the weights."""

    resolution: int  # images are resized to this side before the tower
    channels: tuple[int, ...]  # tower widths; every stage after the first halves the side
    embed_dim: int  # joint image-text space
    text_dim: int  # frozen text encoder width

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))  # JSON gives a list
        for name in ("resolution", "embed_dim", "text_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"evaluator spec: {name} must be a positive integer, got {value!r}")
        if not self.channels or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                        for c in self.channels):
            raise ValueError(f"evaluator spec: channels must be a non-empty list of positive integers, "
                             f"got {list(self.channels)}")
        if self.resolution < 2 ** (len(self.channels) - 1):
            raise ValueError(f"evaluator spec: resolution {self.resolution} is too small for "
                             f"{len(self.channels) - 1} halvings (channels {list(self.channels)})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvaluatorSpec:
        return spec_from_dict(cls, d, "evaluator")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))) at constant width and side."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DomainEvaluator(nn.Module):
    def __init__(self, spec: EvaluatorSpec):
        super().__init__()
        self.spec = spec
        c = spec.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c[0], 3, padding=1), ResBlock(c[0])]
        for c_in, c_out in zip(c[:-1], c[1:]):  # stride-2 conv halves the side, then a residual block
            layers += [_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), ResBlock(c_out)]
        layers += [_norm(c[-1]), nn.SiLU()]
        self.tower = nn.Sequential(*layers)
        self.image_proj = nn.Linear(c[-1], spec.embed_dim)
        self.text_head = nn.Sequential(nn.Linear(spec.text_dim, spec.embed_dim), nn.GELU(),
                                       nn.Linear(spec.embed_dim, spec.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @property
    def scale(self) -> Tensor:
        """The contrastive temperature's inverse, exp(logit_scale) clamped at 100."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    def _prepare(self, images01: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B,3,R,R] in [-1,1] on the model's device and dtype."""
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ValueError(f"evaluator: expected float images [B, 3, H, W] in [0, 1], got {images01.dtype} "
                             f"{list(images01.shape)}")
        weight = self.tower[0].weight
        x = images01.to(weight.device, weight.dtype)
        r = self.spec.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def pooled_features(self, images01: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B, channels[-1]]: the global-average-pooled tower (FID features)."""
        return self.tower(self._prepare(images01)).mean(dim=(2, 3))

    def image_features(self, images01: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> [B,E] unit norm."""
        return F.normalize(self.image_proj(self.pooled_features(images01)), dim=-1)

    def text_features(self, text: Tensor, mask: Tensor) -> Tensor:
        """text [B,L,D], mask [B,L] (bool or 0/1) -> [B,E] unit norm."""
        if text.ndim != 3 or text.shape[-1] != self.spec.text_dim or mask.shape != text.shape[:2]:
            raise ValueError(f"evaluator: expected text [B, L, {self.spec.text_dim}] and mask [B, L], got "
                             f"{list(text.shape)} and {list(mask.shape)}")
        weight = self.image_proj.weight
        text = text.to(weight.device, weight.dtype)
        m = mask.to(text.device, text.dtype).unsqueeze(-1)  # [B,L,1]
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)  # [B,D]; an all-padding row pools to 0
        return F.normalize(self.text_head(pooled), dim=-1)

    def clip_score(self, images01: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        """[B]: 100 * max(cos(image, text), 0), pairwise by row (torchmetrics CLIPScore's convention)."""
        cosine = (self.image_features(images01) * self.text_features(text, mask)).sum(-1)
        return 100 * cosine.clamp(min=0)


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, caption_ids: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch: image_emb, text_emb [B,E] unit norm, logit_scale the multiplier
    (DomainEvaluator.scale), caption_ids [B] long. Rows sharing a caption id are all positives, with
    the target spread evenly over them: the shapes data repeats captions within a batch, and
    one-hot targets would push apart an image and a text that describe each other."""
    logits = logit_scale * image_emb @ text_emb.t()  # [B,B] image i vs text j
    positive = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)  # [B,B], symmetric
    target = positive / positive.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class EvaluatorFeatures(nn.Module):
    """FID feature extractor for torchmetrics:
    `FrechetInceptionDistance(feature=EvaluatorFeatures(ev), normalize=True)`, then update() with
    float images in [0,1] (torchmetrics passes a custom module's input through unchanged)."""

    def __init__(self, evaluator: DomainEvaluator):
        super().__init__()
        self.evaluator = evaluator.eval()
        self.num_features = evaluator.spec.channels[-1]

    def train(self, mode: bool = True) -> EvaluatorFeatures:
        return super().train(False)  # a fixed yardstick: never in training mode (as torchmetrics' Inception)

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        return self.evaluator.pooled_features(images01).float()  # [B, num_features]


# -----------------------------------------------------------------------------
# save / load


def save_evaluator(model: DomainEvaluator, directory: Path, meta: dict) -> Path:
    """directory/evaluator.safetensors + evaluator.json (spec, and `meta`: the text encoder's
    fingerprint and the training data's digest, which make scores comparable across runs)."""
    return save_module(model, directory, fmt=FORMAT, version=FORMAT_VERSION, spec=model.spec.to_dict(),
                       weights_file=WEIGHTS_FILE, spec_file=SPEC_FILE, extra={"meta": dict(meta)})


def read_evaluator_meta(directory: Path) -> dict:
    """The `meta` given to save_evaluator."""
    path = Path(directory) / SPEC_FILE
    meta = read_meta(path, fmt=FORMAT, version=FORMAT_VERSION).get("meta")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: no meta mapping (text encoder fingerprint, data digest)")
    return meta


def load_evaluator(directory: Path, device="cpu") -> DomainEvaluator:
    """Load an evaluator saved by save_evaluator (safetensors only), in eval mode; one-line ValueErrors."""
    return load_saved(directory, what="evaluator", fmt=FORMAT, version=FORMAT_VERSION, spec_cls=EvaluatorSpec,
                      build=DomainEvaluator, weights_file=WEIGHTS_FILE, spec_file=SPEC_FILE, device=device)


def evaluator_digest(directory: Path) -> str:
    return directory_digest(directory, (SPEC_FILE, WEIGHTS_FILE))
