"""FID and CLIP score behind one interface, for the evaluate stage and decoder finetuning.

Backends, chosen by the config (EvaluateConfig.fid / .clip):
    FID   "evaluator": the domain evaluator's pooled features (models.evaluator.EvaluatorFeatures)
          "inception": standard FID InceptionV3 pool3 features (evaluate.fid.inception_weights)
    CLIP  "evaluator": the domain evaluator's image-text cosine on frozen text-encoder features
          "clip":      a local CLIP checkpoint (evaluate.clip.model_path) on the prompt strings
Both FID backends go through torchmetrics' FrechetInceptionDistance with a custom feature module
(fid_metric encodes the real set once, fid_against scores each fake set against it). Every CLIP score
is 100 * max(cos, 0) per image, torchmetrics' CLIPScore convention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

import torch
from torch import Tensor, nn

from components.config import EvaluateConfig

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

FID_KEY = "evaluate.fid.inception_weights"
CLIP_KEY = "evaluate.clip.model_path"
T = TypeVar("T")


def _check_images(images: Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{what}: expected float images [N, 3, H, W] in [0, 1], got {images.dtype} "
                         f"{list(images.shape)}")


class Scorer:
    """FID between two image sets and per-image CLIP scores; images are float [N,3,H,W] in [0,1]."""

    def __init__(self, evaluator: nn.Module | None = None, inception_weights: str | None = None,
                 clip_model_path: str | None = None, batch_size: int = 64,
                 device: str | torch.device | None = None):
        """`evaluator`: a models.evaluator.DomainEvaluator, needed by whichever metric has no weights path.
        `device`: where the Inception/CLIP networks run; default the evaluator's device, else CPU."""
        if batch_size < 1:
            raise ValueError(f"scoring batch_size must be >= 1, got {batch_size}")
        self.fid_backend = "evaluator" if inception_weights is None else "inception"
        self.clip_backend = "evaluator" if clip_model_path is None else "clip"
        if evaluator is None and "evaluator" in (self.fid_backend, self.clip_backend):
            key = FID_KEY if self.fid_backend == "evaluator" else CLIP_KEY
            raise ValueError(f"{key} is null, so scoring needs the domain evaluator, and none was given")
        self.evaluator = evaluator
        self.batch_size = batch_size
        if device is None:
            device = next(evaluator.parameters()).device if evaluator is not None else "cpu"
        self.device = torch.device(device)

        if inception_weights is None:
            from models.evaluator import EvaluatorFeatures  # lazily: the stage imports this module early

            self._fid_features: nn.Module = EvaluatorFeatures(evaluator)
        else:
            from models.inception import load_fid_inception

            self._fid_features = self._load(FID_KEY, load_fid_inception, inception_weights).to(self.device)
        self._clip_metric = None
        if clip_model_path is not None:
            from torchmetrics.multimodal import CLIPScore

            from models.clip_local import load_local_clip

            loader = self._load(CLIP_KEY, load_local_clip, clip_model_path)
            self._clip_metric = CLIPScore(model_name_or_path=loader).to(self.device)

    @staticmethod
    def _load(key: str, load: Callable[[str], T], path: str) -> T:
        """load(path) with the config key in front of its one-line error (which names the path)."""
        try:
            return load(path)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None

    @classmethod
    def from_config(cls, cfg: EvaluateConfig, evaluator: nn.Module | None,
                    device: str | torch.device | None = None) -> Scorer:
        return cls(evaluator, cfg.fid.inception_weights, cfg.clip.model_path, cfg.batch_size, device)

    def fid(self, real: Tensor, fake: Tensor) -> float:
        """Frechet distance between the feature statistics of `real` and `fake` ([N,3,H,W] in [0,1], N >= 2)."""
        return self.fid_against(self.fid_metric(real), fake)

    def _batches(self, images: Tensor | Iterable[Tensor]) -> Iterable[Tensor]:
        """A whole set is split into batches; an iterable of batches (a streamed set) passes through."""
        return images.split(self.batch_size) if isinstance(images, Tensor) else images

    def _feed(self, metric: FrechetInceptionDistance, images: Tensor | Iterable[Tensor], real: bool) -> None:
        name = "real" if real else "fake"
        device = next(self._fid_features.parameters()).device
        for batch in self._batches(images):
            _check_images(batch, f"FID {name} images")
            metric.update(batch.to(device), real=real)
        n = int(metric.real_features_num_samples if real else metric.fake_features_num_samples)
        if n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {n} {name} image(s)")

    @torch.no_grad()
    def fid_metric(self, real: Tensor | Iterable[Tensor]) -> FrechetInceptionDistance:
        """A torchmetrics FrechetInceptionDistance holding `real`'s feature statistics, so that several fake
        sets (a guidance sweep) are scored against it without re-encoding it. `real`: [N,3,H,W] in [0,1]
        (N >= 2), or an iterable of such batches, so a large set never has to be in memory at once."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        device = next(self._fid_features.parameters()).device
        # normalize=True: a custom module gets the float [0,1] batches unchanged. No cross-process sync: the
        # caller hands over whole sets, and a DDP job scoring on rank 0 only must not wait for the others.
        metric = FrechetInceptionDistance(feature=self._fid_features, normalize=True, reset_real_features=False,
                                          sync_on_compute=False).to(device)
        self._feed(metric, real, real=True)
        return metric

    @torch.no_grad()
    def fid_against(self, metric: FrechetInceptionDistance, fake: Tensor | Iterable[Tensor]) -> float:
        """FID of `fake` ([N,3,H,W] in [0,1], N >= 2, or an iterable of batches) against the real set held by
        `metric` (fid_metric)."""
        metric.reset()  # drops the previous fake set only (reset_real_features=False)
        self._feed(metric, fake, real=False)
        return float(metric.compute())

    @torch.no_grad()
    def clip_scores(self, images: Tensor, prompts: list[str], text: Tensor | None = None,
                    mask: Tensor | None = None) -> Tensor:
        """[N] per-image 100 * max(cos(image, prompt), 0), on CPU. `text` [N,L,C] / `mask` [N,L]: the
        prompts' frozen text-encoder features, which the evaluator backend needs (the CLIP one reads `prompts`)."""
        _check_images(images, "CLIP score images")
        n = images.shape[0]
        if len(prompts) != n:
            raise ValueError(f"CLIP score: {n} images but {len(prompts)} prompts")
        scores = []
        if self.clip_backend == "evaluator":
            if text is None or mask is None:
                raise ValueError(f"CLIP score with the domain evaluator ({CLIP_KEY} is null) needs the prompts' "
                                 "text-encoder features: pass text [N, L, C] and mask [N, L]")
            if text.shape[0] != n or mask.shape[0] != n:
                raise ValueError(f"CLIP score: {n} images but text features for {text.shape[0]} and a mask "
                                 f"for {mask.shape[0]}")
            for i in range(0, n, self.batch_size):
                sl = slice(i, i + self.batch_size)
                scores.append(self.evaluator.clip_score(images[sl], text[sl], mask[sl]).float().cpu())
        else:
            # torchmetrics' own per-pair scoring (CLIPScore.update sums these; we need them per image)
            from torchmetrics.functional.multimodal.clip_score import _clip_score_update

            metric = self._clip_metric
            for i in range(0, n, self.batch_size):
                batch = images[i:i + self.batch_size].to(self.device)
                # uint8: the CLIP processor rescales by 1/255 itself, so [0,1] floats would be scaled twice
                batch_u8 = (batch.clamp(0, 1) * 255).round().to(torch.uint8)
                score, _ = _clip_score_update(list(batch_u8), list(prompts[i:i + self.batch_size]),
                                              metric.model, metric.processor)
                scores.append(score.clamp(min=0).float().cpu())
        return torch.cat(scores)  # [N]

    def clip_score(self, images: Tensor, prompts: list[str], text: Tensor | None = None,
                   mask: Tensor | None = None) -> float:
        """Mean of clip_scores."""
        return float(self.clip_scores(images, prompts, text, mask).mean())


def fid_features(cfg: EvaluateConfig, evaluator_dir, features_dir=None) -> nn.Module:
    """The FID feature module `cfg` selects, loaded from disk: decoder finetuning scores its
    reconstructions with the same features as the evaluate stage. Errors are one-line BadInputErrors."""
    from components.errors import BadInputError

    if cfg.fid.inception_weights is not None:
        from models.inception import load_fid_inception

        try:
            return Scorer._load(FID_KEY, load_fid_inception, cfg.fid.inception_weights)
        except ValueError as err:
            raise BadInputError(str(err)) from None
    from components.evaluator import load_for_scoring
    from models.evaluator import EvaluatorFeatures

    return EvaluatorFeatures(load_for_scoring(evaluator_dir, features_dir))
