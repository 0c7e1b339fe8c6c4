"""components.preference: the evaluator and PickScore-style scorers behind one interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from components.config import ScorerConfig
from components.errors import BadInputError
from components.preference import (EvaluatorPreference, PickScorePreference, for_prompts, load_evaluator_preference,
                                   load_pickscore, load_scorer)
from models.evaluator import DomainEvaluator, EvaluatorSpec, save_evaluator
from models.rejection import rejection_sample
from tests.models.test_clip_local import save_tiny_clip

PROMPTS = ["a small red circle", "two large blue squares", "a small green triangle", "three small red squares"]
EVAL_SPEC = EvaluatorSpec(resolution=16, channels=(8, 16), embed_dim=12, text_dim=10)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random tiny CLIPModel + CLIPProcessor, written by the test (no network)."""
    return save_tiny_clip(tmp_path_factory.mktemp("pickscore") / "tiny-pickscore")


def images(n: int, seed: int = 0, side: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [-1, 1]


def evaluator(seed: int = 0) -> DomainEvaluator:
    torch.manual_seed(seed)
    return DomainEvaluator(EVAL_SPEC).eval()


def text_features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, EVAL_SPEC.text_dim, generator=g), torch.ones(n, 5, dtype=torch.bool)


# --- pickscore ------------------------------------------------------------------------------------


def test_pickscore_is_the_clip_models_own_logits_per_image(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    scorer = load_pickscore(str(clip_dir))
    assert isinstance(scorer, PickScorePreference) and scorer.name == "pickscore"
    x = images(4)
    scores = scorer.score(x, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32

    # reference: transformers' CLIPModel forward, logits_per_image = logit_scale.exp() * cos, its diagonal
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    u8 = list(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    inputs = processor(text=PROMPTS, images=u8, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**inputs).logits_per_image.diagonal()
    assert torch.allclose(scores, reference, atol=1e-4)
    # the prompt matters: the same image scores differently against another prompt
    swapped = scorer.score(x, PROMPTS[1:] + PROMPTS[:1])
    assert not torch.allclose(scores, swapped)
    # deterministic: the same weights load again
    assert torch.equal(load_pickscore(clip_dir).score(x, PROMPTS), scores)


def test_pickscore_through_the_config_and_rejection_sampling(clip_dir):
    scorer = load_scorer(ScorerConfig(kind="pickscore", path=str(clip_dir)), Path("unused"))
    assert isinstance(scorer, PickScorePreference)

    def generate(text, mask, seeds):
        return torch.cat([images(1, seed=s) for s in seeds])

    text = torch.zeros(2, 3, 4)
    result = rejection_sample(generate, text, torch.ones(2, 3, dtype=torch.bool), 3,
                              for_prompts(scorer, PROMPTS[:2]), seed=0)
    for i in range(2):
        candidates = torch.cat([images(1, seed=int(s)) for s in result.seeds[i]])
        expected = scorer.score(candidates, [PROMPTS[i]] * 3)
        assert torch.allclose(result.scores[i], expected, atol=1e-5)
        assert int(result.chosen[i]) == int(expected.argmax())


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "absent", "does not exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "not a CLIP checkpoint"),
])
def test_unloadable_pickscore_paths_are_one_line_bad_input_errors_naming_the_path(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(BadInputError) as err:
        load_pickscore(str(path))
    message = str(err.value)
    assert str(path) in message and needle in message and "inference.scorer.path" in message
    assert "\n" not in message


def test_pickscore_without_a_path_says_which_key_to_set():
    with pytest.raises(BadInputError, match="inference.scorer.path is null"):
        load_scorer(ScorerConfig(kind="pickscore", path=None), Path("artifacts"))


# --- the domain evaluator ---------------------------------------------------------------------------


def test_evaluator_score_is_the_unclamped_image_text_cosine():
    ev = evaluator()
    x = images(16, seed=1)
    text, mask = text_features(16)
    scores = EvaluatorPreference(ev).score(x, [f"p{i}" for i in range(16)], text, mask)
    with torch.no_grad():
        cosine = (ev.image_features((x + 1) / 2) * ev.text_features(text, mask)).sum(-1)
    assert torch.allclose(scores, 100 * cosine, atol=1e-5)
    # not the CLIP score's clamp at 0: with the text head's output negated every cosine flips sign, and the
    # candidates stay apart for ranking instead of all tying at 0
    with torch.no_grad():
        ev.text_head[-1].weight.neg_()
        ev.text_head[-1].bias.neg_()
    flipped = EvaluatorPreference(ev).score(x, [f"p{i}" for i in range(16)], text, mask)
    assert (scores > 0).all() and torch.allclose(flipped, -scores, atol=1e-5)
    with pytest.raises(ValueError, match="needs the prompts' frozen text-encoder features"):
        EvaluatorPreference(ev).score(x, ["p"] * 16)
    with pytest.raises(ValueError, match="16 images but 2 prompts"):
        EvaluatorPreference(ev).score(x, ["p"] * 2, text, mask)


def test_evaluator_loads_from_artifacts_and_refuses_another_text_encoder(tmp_path):
    ev = evaluator(3)
    save_evaluator(ev, tmp_path / "evaluator", {"text_encoder_fingerprint": "a" * 64, "data_digest": "x"})
    scorer = load_scorer(ScorerConfig(kind="evaluator", path=None), tmp_path, text_encoder_fingerprint="a" * 64)
    assert isinstance(scorer, EvaluatorPreference) and scorer.name == "evaluator"
    x = images(3, seed=2)
    text, mask = text_features(3, seed=2)
    expected = EvaluatorPreference(ev).score(x, PROMPTS[:3], text, mask)
    assert torch.allclose(scorer.score(x, PROMPTS[:3], text, mask), expected)
    with pytest.raises(BadInputError, match="trained against text encoder aaaaaaaaaaaa, the cascade encodes "
                                            "prompts with bbbbbbbbbbbb"):
        load_evaluator_preference(tmp_path / "evaluator", None, "b" * 64)
    with pytest.raises(BadInputError, match="re-run the evaluator stage") as err:
        load_scorer(ScorerConfig(kind="evaluator", path=None), tmp_path / "nowhere")
    assert "\n" not in str(err.value)


def test_for_prompts_hands_the_scorer_each_candidates_own_prompt_and_features():
    seen = []

    class Recording:
        name = "recording"

        def score(self, images, prompts, text=None, mask=None):
            seen.append((list(prompts), text.clone(), mask.clone()))
            return torch.zeros(len(prompts))

    text, mask = text_features(3)
    mask[1, 3:] = False
    score = for_prompts(Recording(), PROMPTS[:3], text, mask)
    score(images(4), torch.tensor([2, 2, 0, 1]))
    [(prompts, fed_text, fed_mask)] = seen
    assert prompts == [PROMPTS[2], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    assert torch.equal(fed_text, text[[2, 2, 0, 1]]) and torch.equal(fed_mask, mask[[2, 2, 0, 1]])
