"""models.sampling and models.cascade: parallel decoding, guidance, editing, determinism, contracts."""

import math

import pytest
import torch

from models.cascade import Cascade, CascadeSettings
from models.masked_transformer import MaskedTransformer, MaskedTransformerSpec
from models.sampling import SamplerSettings, decode, guidance_at, masked_after, region_to_tokens
from models.tokenizer import ImageTokenizer, TokenizerSpec

SPEC = MaskedTransformerSpec(codebook_size=16, grid=4, text_dim=8, text_length=4, width=16, depth=1, heads=2)


class Recorder(torch.nn.Module):
    """A stand-in model whose logits are given per call; records what it was fed."""

    def __init__(self, spec, logits_fn):
        super().__init__()
        self.spec, self.logits_fn, self.calls = spec, logits_fn, []

    def forward(self, tokens, text, text_mask, cond_tokens=None):
        self.calls.append((tokens.clone(), text.clone(), text_mask.clone()))
        return self.logits_fn(tokens, text, text_mask)


def _text(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, SPEC.text_length, SPEC.text_dim, generator=g), torch.ones(batch, SPEC.text_length, dtype=torch.bool)


def test_cosine_schedule_unmasks_a_growing_share_each_step_and_fills_all():
    steps = 6
    model = Recorder(SPEC, lambda t, x, m: torch.randn(t.shape[0], SPEC.n_tokens, SPEC.codebook_size))
    text, mask = _text()
    out = decode(model, text, mask, SamplerSettings(steps=steps, guidance=0.0), seeds=[0, 1])
    assert out.shape == (2, 16) and out.max() < SPEC.codebook_size
    masked_inputs = [int((tokens == SPEC.mask_id).sum(1)[0]) for tokens, _, _ in model.calls]
    expected = [16] + [int(masked_after(s, steps, torch.tensor([16]))[0]) for s in range(steps - 1)]
    assert masked_inputs == expected
    assert expected == sorted(expected, reverse=True) and expected[1] == math.floor(16 * math.cos(math.pi / 2 / steps))


def test_guidance_combines_logits_with_a_linearly_rising_scale():
    # conditional logits favour token 1 by 0.5 over token 0; unconditional favour token 1 by 2:
    # l_g(1) - l_g(0) = (1 + t) * 0.5 - t * 2 = 0.5 - 1.5 t, so token 1 wins only while t < 1/3
    def logits(tokens, text, text_mask):
        B = tokens.shape[0]
        out = torch.full((B, SPEC.n_tokens, SPEC.codebook_size), -50.0)
        conditional = text_mask.any(1)
        out[:, :, 0] = 0.0
        out[:, :, 1] = torch.where(conditional, 0.5, 2.0)[:, None]
        return out

    steps, scale = 5, 2.0
    model = Recorder(SPEC, logits)
    text, mask = _text(1)
    settings = SamplerSettings(steps=steps, guidance=scale, temperature=0.0, choice_temperature=0.0)
    out = decode(model, text, mask, settings, seeds=[0])
    decided_early = 16 - int(masked_after(0, steps, torch.tensor([16]))[0])  # decoded at step 0, where t = 0
    assert guidance_at(0, steps, scale) == 0 and guidance_at(1, steps, scale) == pytest.approx(0.5)
    assert guidance_at(steps - 1, steps, scale) == scale
    assert int((out == 1).sum()) == decided_early  # every later step has t >= 0.5 > 1/3
    assert int((out == 0).sum()) == 16 - decided_early
    # one batched forward per step: conditional rows then unconditional (null context) rows
    tokens, fed_text, fed_mask = model.calls[0]
    assert len(model.calls) == steps and tokens.shape[0] == 2 and not fed_mask[1].any()


def test_a_negative_prompt_replaces_the_unconditional_branch():
    model = Recorder(SPEC, lambda t, x, m: torch.randn(t.shape[0], SPEC.n_tokens, SPEC.codebook_size))
    text, mask = _text(2)
    negative, negative_mask = _text(2, seed=5)
    decode(model, text, mask, SamplerSettings(steps=2, guidance=3.0), seeds=[0, 1],
           negative_text=negative, negative_mask=negative_mask)
    _, fed_text, fed_mask = model.calls[0]
    assert torch.equal(fed_text[2:], negative) and torch.equal(fed_mask[2:], negative_mask)


def test_decoding_is_deterministic_per_seed_and_independent_of_batch_mates():
    model = MaskedTransformer(SPEC).eval()
    text, mask = _text(3)
    settings = SamplerSettings(steps=4, guidance=2.0)
    a = decode(model, text, mask, settings, seeds=[7, 8, 9])
    assert torch.equal(a, decode(model, text, mask, settings, seeds=[7, 8, 9]))
    assert not torch.equal(a, decode(model, text, mask, settings, seeds=[1, 2, 3]))
    alone = decode(model, text[1:2], mask[1:2], settings, seeds=[8])
    assert torch.equal(alone[0], a[1])


def test_inpainting_keeps_tokens_outside_the_region():
    model = MaskedTransformer(SPEC).eval()
    text, mask = _text(2)
    init = torch.randint(0, SPEC.codebook_size, (2, 16), generator=torch.Generator().manual_seed(0))
    region = torch.zeros(2, 16, dtype=torch.bool)
    region[:, 5:11] = True
    calls = Recorder(SPEC, lambda t, x, m: model(t, x, m))
    out = decode(calls, text, mask, SamplerSettings(steps=3, guidance=0.0), seeds=[0, 1], init_tokens=init,
                 regenerate=region)
    assert torch.equal(out[~region], init[~region])
    first_input = calls.calls[0][0]
    assert (first_input[region] == SPEC.mask_id).all() and torch.equal(first_input[~region], init[~region])
    # outpainting is the same with the region inverted
    out = decode(model, text, mask, SamplerSettings(steps=3, guidance=0.0), seeds=[0, 1], init_tokens=init,
                 regenerate=~region)
    assert torch.equal(out[region], init[region])


def test_region_to_tokens_marks_every_patch_the_region_touches():
    region = torch.zeros(1, 8, 8, dtype=torch.bool)
    region[0, 0, 0] = True  # top-left patch
    region[0, 6:8, 6] = True  # bottom-right patch
    region[0, 3, 3] = True  # rows 2-3 x cols 2-3: patch 5
    assert region_to_tokens(region, 4)[0].nonzero().flatten().tolist() == [0, 5, 15]
    with pytest.raises(ValueError, match="not a multiple"):
        region_to_tokens(torch.zeros(1, 9, 9, dtype=torch.bool), 4)


def test_sampler_settings_are_validated():
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0, guidance=1.0)
    with pytest.raises(ValueError, match="guidance"):
        SamplerSettings(steps=2, guidance=float("nan"))
    with pytest.raises(ValueError, match="one seed per prompt"):
        decode(MaskedTransformer(SPEC), *_text(2), SamplerSettings(steps=1, guidance=0.0), seeds=[0])


# --- the cascade ------------------------------------------------------------------------------

LOW = TokenizerSpec("vqgan", 8, 2, (8, 8), 1, 4, 16, norm_groups=4)  # 4x4 tokens, codebook 16
HIGH = TokenizerSpec("vqgan", 16, 2, (8, 8), 1, 4, 20, norm_groups=4)  # 8x8 tokens, codebook 20
SR = MaskedTransformerSpec(codebook_size=20, grid=8, text_dim=8, text_length=4, width=16, depth=1, heads=2,
                           cond_codebook_size=16, cond_grid=4, cond_depth=1)
SETTINGS = CascadeSettings(SamplerSettings(steps=3, guidance=1.0), SamplerSettings(steps=2, guidance=1.0))


def _cascade(base_spec=SPEC, sr_spec=SR, low=LOW, high=HIGH):
    torch.manual_seed(0)
    return Cascade(None, MaskedTransformer(base_spec).eval(), MaskedTransformer(sr_spec).eval(),
                   ImageTokenizer(low).eval(), ImageTokenizer(high).eval(), SETTINGS, text_dim=8)


def test_cascade_generates_images_at_the_superres_resolution_deterministically():
    cascade = _cascade()
    text, mask = _text(2)
    images = cascade.generate_from_text(text, mask, seed=3)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, cascade.generate_from_text(text, mask, seed=3))


def test_cascade_edit_keeps_the_tokens_outside_the_region():
    cascade = _cascade()
    text, mask = _text(1)
    cascade.encode_text = lambda prompts: (text, mask)  # no text encoder in this test
    decoded = []
    cascade.decode_tokens = lambda tokens: decoded.append(tokens) or torch.zeros(1, 3, 16, 16)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    region = torch.zeros(1, 16, 16, dtype=torch.bool)
    region[:, :, :4] = True  # the left quarter: token columns 0-1 of the 8x8 map
    cascade.edit(["x"], image, region)
    original = cascade.decoder.encode(image).flatten(1).view(1, 8, 8)
    edited = decoded[0].view(1, 8, 8)
    assert torch.equal(edited[..., 2:], original[..., 2:])
    cascade.edit(["x"], image, region, outpaint=True)
    assert torch.equal(decoded[1].view(1, 8, 8)[..., :2], original[..., :2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_spec=MaskedTransformerSpec(**{**SPEC.to_dict(), "codebook_size": 32})), "base generator: vocabulary 33"),
    (dict(sr_spec=MaskedTransformerSpec(**{**SR.to_dict(), "grid": 4})), "super-res generator: token grid 4x4"),
    (dict(sr_spec=MaskedTransformerSpec(**{**SR.to_dict(), "cond_codebook_size": 8})), "low-res vocabulary 8"),
    (dict(base_spec=MaskedTransformerSpec(**{**SPEC.to_dict(), "text_dim": 12})), "reads text of width 12"),
    (dict(base_spec=SR, sr_spec=SPEC), "must be a base model"),
])
def test_cascade_contracts_are_asserted_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _cascade(**kwargs)


@pytest.mark.gpu
def test_decoding_and_the_cascade_on_cuda_are_deterministic_and_draw_what_the_cpu_draws():
    """The sampler's noise comes from per-seed CPU generators, so a GPU run draws the same tokens
    as a CPU run up to ties that kernel rounding can flip."""
    model = MaskedTransformer(SPEC).eval()
    text, mask = _text(8)
    settings = SamplerSettings(steps=4, guidance=2.0)
    seeds = list(range(8))
    cpu_tokens = decode(model, text, mask, settings, seeds=seeds)
    model.cuda()
    gpu_tokens = decode(model, text.cuda(), mask.cuda(), settings, seeds=seeds)
    assert gpu_tokens.device.type == "cuda"
    assert torch.equal(gpu_tokens, decode(model, text.cuda(), mask.cuda(), settings, seeds=seeds))
    assert (gpu_tokens.cpu() == cpu_tokens).float().mean() >= 0.95

    cascade = _cascade()
    text, mask = _text(2)
    cpu_images = cascade.generate_from_text(text, mask, seed=3)
    cascade.cuda()
    images = cascade.generate_from_text(text.cuda(), mask.cuda(), seed=3)
    assert images.device.type == "cuda" and images.shape == cpu_images.shape
    assert torch.equal(images, cascade.generate_from_text(text.cuda(), mask.cuda(), seed=3))
