"""Prompt sets for the exact checker: one split's accepted items with scenes, in manifest order.
(`compositional.test_prompts` is reached through the module: imported bare, pytest would collect it.)"""

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
