"""Preference scorers for rejection sampling (models.rejection), behind one interface.

    scorer.score(images [B,3,R,R] in [-1,1], prompts list[str], text [B,L,D] | None, mask [B,L] | None) -> [B]

Higher is better. Kinds (params inference.scorer.kind):
    evaluator  the domain evaluator's image-text score, 100 * cos(image, text) on the frozen text-encoder
               features (artifacts/evaluator). Not clamped at 0 as the CLIP score is: a clamp would make
               every candidate with a negative cosine tie, and ranking needs them apart.
    pickscore  a PickScore-style preference model from a local directory (inference.scorer.path) holding a
               transformers CLIPModel + processor: logit_scale * cos(image, prompt), as PickScore ranks.

for_prompts() binds a scorer to one run's prompts, giving the score(images, prompt_indices) callable that
models.rejection.rejection_sample takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from components.config import ScorerConfig
from components.errors import BadInputError

PATH_KEY = "inference.scorer.path"


class PreferenceScorer(Protocol):
    name: str

    def score(self, images: Tensor, prompts: list[str], text: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor: ...


def _check_images(images: Tensor, n_prompts: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"preference score: expected float images [B, 3, H, W] in [-1, 1], got {images.dtype} "
                         f"{list(images.shape)}")
    if images.shape[0] != n_prompts:
        raise ValueError(f"preference score: {images.shape[0]} images but {n_prompts} prompts")


class EvaluatorPreference:
    """100 * cos(image, text) from the domain evaluator (models.evaluator.DomainEvaluator)."""

    name = "evaluator"

    def __init__(self, evaluator: nn.Module):
        self.evaluator = evaluator.eval()

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str], text: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
        _check_images(images, len(prompts))
        if text is None or mask is None:
            raise ValueError("the evaluator scorer needs the prompts' frozen text-encoder features (text, mask)")
        images01 = (images.float().clamp(-1, 1) + 1) / 2  # the evaluator reads [0, 1]
        cosine = (self.evaluator.image_features(images01) * self.evaluator.text_features(text, mask)).sum(-1)
        return 100 * cosine.float().cpu()  # [B]


class PickScorePreference:
    """PickScore's ranking: logit_scale.exp() * cos(image_emb, text_emb), a CLIPModel's logits_per_image."""

    name = "pickscore"

    def __init__(self, model: nn.Module, processor):
        """model: models.clip_local.ProjectedCLIP (projected image/text features), processor: its CLIPProcessor."""
        self.model, self.processor = model, processor

    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str], text: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
        _check_images(images, len(prompts))
        # uint8 HxWx3: the processor rescales by 1/255 and normalises itself
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = list(pixels.permute(0, 2, 3, 1).cpu().numpy())
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
        device = next(self.model.parameters()).device
        image_emb = self.model.get_image_features(inputs["pixel_values"].to(device))  # [B,E]
        text_emb = self.model.get_text_features(inputs["input_ids"].to(device),
                                                inputs["attention_mask"].to(device))  # [B,E]
        cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        return (self.model.clip.logit_scale.exp() * cosine).float().cpu()  # [B]


def load_pickscore(path: str | Path | None) -> PickScorePreference:
    """A PickScore-style model from a local CLIPModel + processor directory; one-line BadInputError."""
    if not path:
        raise BadInputError(f"{PATH_KEY} is null: the pickscore scorer needs a local CLIPModel + processor "
                            "directory (e.g. a downloaded yuvalkirstain/PickScore_v1)")
    from models.clip_local import load_local_clip

    try:
        model, processor = load_local_clip(path)()
    except ValueError as err:  # already one line, naming the directory
        raise BadInputError(f"{PATH_KEY}: {err}") from None
    return PickScorePreference(model, processor)


def load_evaluator_preference(evaluator_dir: Path, features_dir: Path | None = None,
                              text_encoder_fingerprint: str | None = None) -> EvaluatorPreference:
    """The domain evaluator as a scorer. The text features it will read must come from the encoder it was
    trained against: checked against `features_dir`'s store and/or the generating cascade's encoder."""
    from components.evaluator import load_for_scoring
    from models.evaluator import read_evaluator_meta

    evaluator = load_for_scoring(Path(evaluator_dir), features_dir if features_dir and Path(features_dir).is_dir()
                                 else None)
    if text_encoder_fingerprint is not None:
        trained = read_evaluator_meta(Path(evaluator_dir)).get("text_encoder_fingerprint")
        if trained != text_encoder_fingerprint:
            raise BadInputError(f"{evaluator_dir} was trained against text encoder {str(trained)[:12]}, the cascade "
                                f"encodes prompts with {text_encoder_fingerprint[:12]}; its scores would be noise "
                                "(re-run the evaluator stage, or set inference.scorer.kind: pickscore)")
    return EvaluatorPreference(evaluator)


def load_scorer(cfg: ScorerConfig, artifacts: Path, text_encoder_fingerprint: str | None = None) -> PreferenceScorer:
    """The scorer params inference.scorer selects; the evaluator comes from a DVC-layout `artifacts` folder."""
    if cfg.kind == "pickscore":
        return load_pickscore(cfg.path)
    artifacts = Path(artifacts)
    return load_evaluator_preference(artifacts / "evaluator", artifacts / "features", text_encoder_fingerprint)


def for_prompts(scorer: PreferenceScorer, prompts: list[str], text: Tensor | None = None,
                mask: Tensor | None = None):
    """score(images [B,3,R,R], prompt_indices [B] long) -> [B], for models.rejection.rejection_sample."""

    def score(images: Tensor, indices: Tensor) -> Tensor:
        idx = indices.tolist()
        return scorer.score(images, [prompts[i] for i in idx],
                            None if text is None else text[indices.to(text.device)],
                            None if mask is None else mask[indices.to(mask.device)])

    return score
