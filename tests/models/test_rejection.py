"""models.rejection: N candidates per prompt, seeded per candidate, the scorer's best kept."""

from __future__ import annotations

import pytest
import torch

from models.rejection import candidate_seeds, rejection_sample
from tests.models.test_sampling import _cascade, _text


def seeded_images(seeds: list[int], side: int = 4) -> torch.Tensor:
    """[B,3,side,side] in [-1,1], a deterministic function of each seed alone."""
    return torch.stack([torch.rand(3, side, side, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds])


class FakeGenerator:
    """generate(text, mask, seeds) whose images depend only on the seeds; records every call."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, list[int]]] = []

    def __call__(self, text, mask, seeds):
        self.calls.append((text.clone(), list(seeds)))
        return seeded_images(seeds)


def brightness(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_candidate_seeds_are_seed_plus_i_n_plus_j():
    assert candidate_seeds(10, 3, 4).tolist() == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    assert candidate_seeds(5, 3, 1).flatten().tolist() == [5, 6, 7]  # N = 1: plain generation's seeds


def test_keeps_the_best_scoring_candidate_of_each_prompt():
    text, mask = _text(3)
    gen = FakeGenerator()
    result = rejection_sample(gen, text, mask, 4, brightness, seed=7, batch_size=5)
    seeds = candidate_seeds(7, 3, 4)
    expected_scores = torch.stack([brightness(seeded_images(row.tolist()), None) for row in seeds])  # [3,4]
    assert torch.allclose(result.scores, expected_scores)
    assert torch.equal(result.chosen, expected_scores.argmax(1))
    assert torch.equal(result.seeds, seeds)
    assert torch.equal(result.images, seeded_images([int(seeds[i, j]) for i, j in enumerate(result.chosen)]))
    assert torch.allclose(result.best_scores, expected_scores.max(1).values)
    # the random images make the best candidate not always the first one
    assert result.chosen.tolist() != [0, 0, 0]
    # batches of 5 candidates, prompt-major: each candidate got its own prompt's text
    assert [len(s) for _, s in gen.calls] == [5, 5, 2]
    fed_text = torch.cat([t for t, _ in gen.calls])
    assert torch.equal(fed_text, text.repeat_interleave(4, dim=0))


def test_the_result_does_not_depend_on_the_batch_size():
    text, mask = _text(3)
    results = [rejection_sample(FakeGenerator(), text, mask, 3, brightness, seed=1, batch_size=b) for b in (1, 4, 64)]
    for other in results[1:]:
        assert torch.equal(other.images, results[0].images) and torch.equal(other.scores, results[0].scores)
        assert torch.equal(other.chosen, results[0].chosen)


def test_ties_keep_the_first_candidate_and_the_scorer_sees_prompt_indices():
    text, mask = _text(2)
    seen = []

    def constant(images, indices):
        seen.extend(indices.tolist())
        return torch.ones(len(indices))

    result = rejection_sample(FakeGenerator(), text, mask, 3, constant, seed=0, batch_size=2)
    assert result.chosen.tolist() == [0, 0]
    assert torch.equal(result.images, seeded_images([0, 3]))
    assert seen == [0, 0, 0, 1, 1, 1]


def test_one_candidate_reproduces_plain_generation_on_a_real_cascade():
    cascade = _cascade()
    text, mask = _text(2)

    def generate(t, m, seeds):
        return cascade.generate_from_text(t, m, seeds=seeds)

    plain = cascade.generate_from_text(text, mask, seed=5)  # image i from seed 5 + i
    result = rejection_sample(generate, text, mask, 1, brightness, seed=5)
    assert torch.equal(result.images, plain) and result.chosen.tolist() == [0, 0]
    # with 3 candidates the kept image is exactly the plain generation from the chosen candidate's seed
    best = rejection_sample(generate, text, mask, 3, brightness, seed=5, batch_size=4)
    chosen_seeds = [int(best.seeds[i, j]) for i, j in enumerate(best.chosen)]
    for i, s in enumerate(chosen_seeds):
        alone = cascade.generate_from_text(text[i:i + 1], mask[i:i + 1], seed=s)
        assert torch.allclose(best.images[i:i + 1], alone, atol=1e-5)  # same tokens; conv batching rounds
    assert torch.equal(best.best_scores, best.scores.max(1).values)
    assert (best.best_scores >= best.scores[:, 0]).all()


@pytest.mark.parametrize("score, message", [
    (lambda images, idx: torch.ones(len(idx) + 1), "returned 3 scores for 2 images"),
    (lambda images, idx: torch.full((len(idx),), float("nan")), "non-finite score"),
])
def test_bad_scorers_are_refused(score, message):
    text, mask = _text(1)
    with pytest.raises(ValueError, match=message):
        rejection_sample(FakeGenerator(), text, mask, 2, score)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "candidates per prompt must be an integer >= 1"),
    (dict(n=2, batch_size=0), "batch_size must be >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    text, mask = _text(1)
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=message):
        rejection_sample(FakeGenerator(), text, mask, n, brightness, **kwargs)
