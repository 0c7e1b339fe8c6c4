"""components.scoring: FID and CLIP score from the domain evaluator, FID InceptionV3 or a local CLIP."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import ClipConfig, FidConfig, load_config
from components.scoring import Scorer

REPO = Path(__file__).resolve().parents[2]
TEXT_DIM = 12


class StandInEvaluator(nn.Module):
    """A tiny conv net with the models.evaluator.DomainEvaluator interface."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.spec = SimpleNamespace(channels=(8, 16))  # EvaluatorFeatures reads num_features from channels[-1]
        self.tower = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.image_proj = nn.Linear(16, 8)
        self.text_head = nn.Linear(TEXT_DIM, 8)

    def pooled_features(self, images01: Tensor) -> Tensor:
        return self.tower(images01 * 2 - 1).mean(dim=(2, 3))  # [B,16]

    def image_features(self, images01: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.pooled_features(images01)), dim=-1)  # [B,8]

    def text_features(self, text: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(text.dtype).unsqueeze(-1)  # [B,L,1]
        return F.normalize(self.text_head((text * m).sum(1) / m.sum(1).clamp(min=1)), dim=-1)  # [B,8]

    def clip_score(self, images01: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        return 100 * (self.image_features(images01) * self.text_features(text, mask)).sum(-1).clamp(min=0)  # [B]


def image_sets(n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 16, 16, generator=g)  # [N,3,H,W] in [0,1]
    y = torch.rand(n, 3, 16, 16, generator=g) ** 3  # darker: another distribution
    return x, y


def text_features(n: int, length: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    text = torch.randn(n, length, TEXT_DIM, generator=g)  # [N,L,C]
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (n, 1), generator=g)  # [N,L]
    return text, mask


@pytest.fixture(scope="module")
def evaluate_cfg():
    return load_config(REPO / "params.yaml", profile="smoke").evaluate


def check_fid(scorer: Scorer, x: Tensor, y: Tensor) -> float:
    same, different = scorer.fid(x, x), scorer.fid(x, y)
    assert different > 1e-3 and abs(same) < 1e-3 * different
    return different


def test_evaluator_backends_from_config(evaluate_cfg):
    scorer = Scorer.from_config(evaluate_cfg, StandInEvaluator())
    assert (scorer.fid_backend, scorer.clip_backend, scorer.batch_size) == ("evaluator", "evaluator",
                                                                           evaluate_cfg.batch_size)
    x, y = image_sets()
    different = check_fid(scorer, x, y)
    # batches are accumulated, not scored one by one
    assert Scorer(scorer.evaluator, batch_size=4).fid(x, y) == pytest.approx(different, rel=1e-4)
    # one real set, several fake sets: each fake set replaces the previous one
    real = scorer.fid_metric(x)
    assert scorer.fid_against(real, y) == pytest.approx(different, rel=1e-4)
    assert abs(scorer.fid_against(real, x)) < 1e-3 * different
    assert scorer.fid_against(real, y) == pytest.approx(different, rel=1e-4)

    text, mask = text_features(len(x))
    prompts = [f"prompt {i}" for i in range(len(x))]
    scores = scorer.clip_scores(x, prompts, text, mask)
    assert scores.shape == (len(x),) and ((scores >= 0) & (scores <= 100)).all() and scores.max() > 0
    torch.testing.assert_close(scores, scorer.evaluator.clip_score(x, text, mask).detach())
    torch.testing.assert_close(Scorer(scorer.evaluator, batch_size=4).clip_scores(x, prompts, text, mask), scores)
    assert scorer.clip_score(x, prompts, text, mask) == pytest.approx(float(scores.mean()))


def test_real_domain_evaluator():
    from models.evaluator import DomainEvaluator, EvaluatorSpec

    torch.manual_seed(0)
    evaluator = DomainEvaluator(EvaluatorSpec(resolution=16, channels=(8, 16), embed_dim=8, text_dim=TEXT_DIM))
    scorer = Scorer(evaluator, batch_size=4)
    x, y = image_sets()
    check_fid(scorer, x, y)
    text, mask = text_features(len(x))
    scores = scorer.clip_scores(x, [""] * len(x), text, mask)
    assert scores.shape == (len(x),) and ((scores >= 0) & (scores <= 100)).all()
    torch.testing.assert_close(scores, evaluator.clip_score(x, text, mask).detach())


def test_bad_input_is_a_one_line_error(evaluate_cfg):
    scorer = Scorer(StandInEvaluator())
    x, _ = image_sets(3)
    text, mask = text_features(3)
    cases = [
        (lambda: scorer.fid(x[:1], x), "FID needs at least 2 images per set, got 1 real"),
        (lambda: scorer.fid(x, x[:1]), "got 1 fake"),
        (lambda: scorer.fid_against(scorer.fid_metric(x), x[:1]), "got 1 fake"),
        (lambda: scorer.fid(x, (x * 255).to(torch.uint8)), "expected float images"),
        (lambda: scorer.clip_scores(x, ["a"] * 3), "pass text [N, L, C] and mask [N, L]"),
        (lambda: scorer.clip_scores(x, ["a"] * 2, text, mask), "3 images but 2 prompts"),
        (lambda: scorer.clip_scores(x, ["a"] * 3, text[:2], mask[:2]), "text features for 2"),
        (lambda: Scorer(None), "evaluate.fid.inception_weights is null"),
        (lambda: Scorer(batch_size=0), "batch_size must be >= 1"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_weights_name_the_config_key(tmp_path, evaluate_cfg):
    ev = StandInEvaluator()
    missing = tmp_path / "nowhere"
    for cfg, key in [(replace(evaluate_cfg, fid=FidConfig(inception_weights=str(missing / "pt_inception.pth"))),
                      "evaluate.fid.inception_weights"),
                     (replace(evaluate_cfg, clip=ClipConfig(model_path=str(missing))), "evaluate.clip.model_path")]:
        with pytest.raises(ValueError) as err:
            Scorer.from_config(cfg, ev)
        assert str(err.value).startswith(key) and str(missing) in str(err.value) and "\n" not in str(err.value)


def test_inception_and_clip_backends(tmp_path, evaluate_cfg):
    from torchmetrics.multimodal import CLIPScore

    from models.clip_local import load_local_clip
    from tests.models.test_clip_local import save_tiny_clip
    from tests.models.test_inception import random_inception, save_state

    weights = save_state(random_inception(), tmp_path / "inception.safetensors")
    clip_dir = save_tiny_clip(tmp_path / "clip")
    cfg = replace(evaluate_cfg, batch_size=2, fid=FidConfig(inception_weights=str(weights)),
                  clip=ClipConfig(model_path=str(clip_dir)))
    scorer = Scorer.from_config(cfg, evaluator=None)  # neither metric needs the domain evaluator
    assert (scorer.fid_backend, scorer.clip_backend) == ("inception", "clip")

    x, y = image_sets(3)
    fid = scorer.fid(x, y)
    assert fid > 1e-3 and torch.isfinite(torch.tensor(fid))

    prompts = ["two red circles", "a blue square", "one green triangle"]
    scores = scorer.clip_scores(x, prompts)  # no text features needed
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()
    # each equals torchmetrics' CLIPScore of that image alone (images as uint8, as the processor expects)
    metric = CLIPScore(model_name_or_path=load_local_clip(clip_dir))
    with torch.no_grad():
        expected = torch.stack([metric(x[i:i + 1].mul(255).round().to(torch.uint8), prompts[i:i + 1])
                                for i in range(3)])
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-4)
    # negated text embeddings flip every cosine: the positive scores above become 0 (max(cos, 0))
    assert (scores > 0).all()
    with torch.no_grad():
        scorer._clip_metric.model.clip.text_projection.weight.neg_()
    assert (scorer.clip_scores(x, prompts) == 0).all()


def test_fid_of_streamed_batches_equals_fid_of_the_whole_sets():
    """The evaluate stage streams generated batches (a 30k-prompt sweep never sits in memory at once)."""
    scorer = Scorer(StandInEvaluator(), batch_size=3)
    x, y = image_sets()
    whole = scorer.fid(x, y)
    streamed = scorer.fid_against(scorer.fid_metric(iter(x.split(2))), (b for b in y.split(5)))
    assert streamed == pytest.approx(whole, rel=1e-5) and whole > 0
    with pytest.raises(ValueError, match="got 1 fake"):
        scorer.fid_against(scorer.fid_metric(x), iter([y[:1]]))
