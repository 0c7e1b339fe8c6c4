"""components.cascades: the family-agnostic evaluation hook over a whole cascade."""

import torch

from components.cascades import checked_generate


class RecordingCascade:
    """Stands in for models.cascade.Cascade: records what evaluation asked of it."""

    def __init__(self):
        self.calls = []

    def generate_from_text(self, text, mask, seeds, guidance, superres_guidance):
        self.calls.append({"seeds": list(seeds), "guidance": guidance, "superres_guidance": superres_guidance})
        return torch.zeros(len(seeds), 3, 4, 4)


def test_guidance_zero_switches_guidance_off_in_both_models():
    cascade = RecordingCascade()
    checked_generate(cascade)(torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), [5, 6], 0.0)
    assert cascade.calls == [{"seeds": [5, 6], "guidance": 0.0, "superres_guidance": 0.0}]


def test_default_guidance_keeps_the_base_default_and_passes_superres_its_own():
    cascade = RecordingCascade()
    images = checked_generate(cascade)(torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), [7], 1.5)
    # None = the base model's own default (cfg.base.sample.guidance), never the super-res scale
    assert cascade.calls == [{"seeds": [7], "guidance": None, "superres_guidance": 1.5}]
    assert images.shape == (1, 3, 4, 4)
