"""Prompt sets for the exact checker (one split's accepted items with scenes, in manifest order) and
the seed sets they are sampled with.
(`compositional.test_prompts` is reached through the module: imported bare, pytest would collect it.)"""

import pytest
import torch

from components import compositional
from components.compositional import split_prompts
from components.io import read_accepted


def test_split_prompts_take_only_that_split_in_manifest_order_up_to_the_limit(smoke_artifacts):
    rows = read_accepted(smoke_artifacts.validate, ["key", "caption", "split", "scene"])
    for split in ("val", "test"):
        expected = rows[(rows["split"] == split) & rows["scene"].notna()]
        assert len(expected) >= 3, f"the smoke profile should hold a few {split} items"
        prompts = split_prompts(smoke_artifacts.validate, split, limit=3)
        assert prompts.keys == expected["key"].head(3).tolist()
        assert prompts.captions == expected["caption"].head(3).tolist()
        assert len(prompts.scenes) == 3 and all(s.groups for s in prompts.scenes)
    everything = split_prompts(smoke_artifacts.validate, "val", limit=10_000)
    assert len(everything) == int(((rows["split"] == "val") & rows["scene"].notna()).sum())
    assert compositional.test_prompts(smoke_artifacts.validate, 5).keys == split_prompts(smoke_artifacts.validate, "test", 5).keys


class _Features:
    def lookup(self, keys):
        return torch.zeros(len(keys), 2, 4), torch.ones(len(keys), 2, dtype=torch.bool)


def test_each_seed_set_draws_prompt_i_with_its_own_disjoint_seed(smoke_artifacts):
    prompts = compositional.test_prompts(smoke_artifacts.validate, 5)
    seen = []

    def generate(text, mask, seeds, guidance):
        seen.append(list(seeds))
        return -torch.ones(len(seeds), 3, 8, 8)  # black images: the checker finds nothing

    for seed_set in (0, 2):
        by_guidance, images = compositional.sample_and_check(generate, prompts, _Features(), [1.0], batch_size=2,
                                                             seed_set=seed_set)
        assert images[1.0].shape == (5, 8, 8, 3) and by_guidance[1.0]["overall"] == 0.0
    stride = compositional.SEED_SET_STRIDE
    set2 = [2 * stride + i for i in range(5)]
    assert seen == [[0, 1], [2, 3], [4], set2[:2], set2[2:4], set2[4:]]


def test_seed_set_metrics_are_the_per_set_headlines_and_the_mean_of_every_category():
    by_set = {j: {c: v for c in compositional.CATEGORIES} for j, v in enumerate((0.5, 0.75, 1.0))}
    by_set[2].pop("position")  # a set without positional prompts drops the category's mean, not the others
    metrics = compositional.seed_set_metrics(by_set)
    assert metrics["checker_single_colour_shape_mean"] == pytest.approx(0.75)
    assert [metrics[f"checker_pair_overall_set{j}"] for j in range(3)] == [0.5, 0.75, 1.0]
    assert "checker_position_mean" not in metrics and "checker_colour_set0" not in metrics
    assert compositional.seed_set_metrics({0: by_set[0]}) == {}  # one set: checker_<category> says it all
    table = compositional.seed_set_table(by_set, 1.0)
    assert "| 1 (seeds 100000 + i) | 75.0%" in table and "| mean of 3 | 75.0%" in table
