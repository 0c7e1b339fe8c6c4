"""models.masked_transformer: shapes, contracts, Muse masking, loss, save/load."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.masked_transformer import (MaskedTransformer, MaskedTransformerSpec, check_tokenizer_contract,
                                       load_generator, masked_token_loss, random_token_mask, sample_mask_rates,
                                       save_generator)

BASE = MaskedTransformerSpec(codebook_size=16, grid=4, text_dim=12, text_length=5, width=32, depth=2, heads=4)
SUPERRES = MaskedTransformerSpec(codebook_size=20, grid=8, text_dim=12, text_length=5, width=32, depth=1, heads=4,
                                 cond_codebook_size=16, cond_grid=4, cond_depth=1)


def _inputs(spec, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.vocab_size, (batch, spec.n_tokens), generator=g)
    text = torch.randn(batch, spec.text_length, spec.text_dim, generator=g)
    mask = torch.ones(batch, spec.text_length, dtype=torch.bool)
    mask[:, 3:] = False
    cond = torch.randint(0, spec.cond_codebook_size, (batch, spec.cond_grid ** 2), generator=g) if spec.is_superres else None
    return tokens, text, mask, cond


@pytest.mark.parametrize("spec", [BASE, SUPERRES], ids=["base", "superres"])
def test_logits_cover_the_codebook_but_not_mask(spec):
    logits = MaskedTransformer(spec)(*_inputs(spec))
    assert logits.shape == (3, spec.n_tokens, spec.codebook_size)
    assert spec.vocab_size == spec.codebook_size + 1 and spec.mask_id == spec.codebook_size


def test_superres_output_depends_on_the_low_res_map_and_base_has_none():
    model = MaskedTransformer(SUPERRES).eval()
    tokens, text, mask, cond = _inputs(SUPERRES)
    other = (cond + 1) % SUPERRES.cond_codebook_size
    assert not torch.allclose(model(tokens, text, mask, cond), model(tokens, text, mask, other))
    with pytest.raises(ValueError, match="cond_tokens"):
        model(tokens, text, mask, None)
    assert not hasattr(MaskedTransformer(BASE), "cond_embedding")


def test_upsample_gives_each_image_token_the_low_res_cell_it_lies_in():
    model = MaskedTransformer(SUPERRES)  # 8x8 image grid over a 4x4 low-res grid: 2x2 blocks
    cells = torch.arange(16.0).view(1, 16, 1).expand(2, -1, 3)  # feature = the cell's row-major index
    up = model.upsample_to_grid(cells)  # [2, 64, 3]
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = ((rows // 2) * 4 + cols // 2).flatten().float()
    assert up.shape == (2, 64, 3) and torch.equal(up[1, :, 2], expected)


def test_cond_add_adds_no_parameters_and_changes_the_output():
    added = MaskedTransformerSpec(**{**SUPERRES.to_dict(), "cond_add": True})
    with_add, without = MaskedTransformer(added).eval(), MaskedTransformer(SUPERRES).eval()
    without.load_state_dict(with_add.state_dict())  # same tensors: older super-res checkpoints still load
    inputs = _inputs(SUPERRES)
    assert not torch.allclose(with_add(*inputs), without(*inputs))


def test_dropped_text_leaves_only_the_null_context():
    model = MaskedTransformer(BASE).eval()
    tokens, text, _, _ = _inputs(BASE)
    off = torch.zeros(3, BASE.text_length, dtype=torch.bool)
    a = model(tokens, text, off)
    b = model(tokens, torch.randn_like(text), off)  # text values must not leak through masked positions
    assert torch.allclose(a, b) and torch.isfinite(a).all()
    assert not torch.allclose(a, model(tokens, text, torch.ones_like(off)))


def test_padding_positions_of_the_text_are_ignored():
    model = MaskedTransformer(BASE).eval()
    tokens, text, mask, _ = _inputs(BASE)
    changed = text.clone()
    changed[:, 3:] = 99.0  # beyond the mask
    assert torch.allclose(model(tokens, text, mask), model(tokens, changed, mask), atol=1e-6)


def test_bad_shapes_fail_with_the_expected_shape():
    model = MaskedTransformer(BASE)
    tokens, text, mask, _ = _inputs(BASE)
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        model(tokens[:, :10], text, mask)
    with pytest.raises(ValueError, match=r"\[B, L, 12\]"):
        model(tokens, text[..., :5], mask)


@pytest.mark.parametrize("change, message", [
    (dict(width=30), "not divisible by heads"),
    (dict(cond_grid=4), "both cond_codebook_size and cond_grid"),
    (dict(cond_depth=2), "needs a low-res token map"),
    (dict(cond_add=True), "cond_add needs a low-res token map"),
    (dict(grid=6, cond_codebook_size=16, cond_grid=4, cond_add=True), "grid 6 to be a multiple of the low-res grid 4"),
    (dict(depth=0), "depth must be a positive integer"),
])
def test_spec_validation(change, message):
    with pytest.raises(ValueError, match=message):
        MaskedTransformerSpec(**{**BASE.to_dict(), **change})


def test_contract_vocabulary_is_codebook_plus_mask_and_grids_match():
    check_tokenizer_contract(BASE, codebook_size=16, grid=4)
    with pytest.raises(ValueError, match=r"vocabulary 17 != tokenizer codebook 32 \+ 1"):
        check_tokenizer_contract(BASE, codebook_size=32, grid=4)
    with pytest.raises(ValueError, match="token grid 4x4 != the tokenizer's 8x8"):
        check_tokenizer_contract(BASE, codebook_size=16, grid=8)
    check_tokenizer_contract(SUPERRES, 20, 8, cond_codebook_size=16, cond_grid=4)
    with pytest.raises(ValueError, match="low-res vocabulary 16 != base tokenizer codebook 64"):
        check_tokenizer_contract(SUPERRES, 20, 8, cond_codebook_size=64, cond_grid=4)
    with pytest.raises(ValueError, match="low-res grid"):
        check_tokenizer_contract(SUPERRES, 20, 8, cond_codebook_size=16, cond_grid=2)


def test_mask_rates_follow_the_muse_arccos_distribution():
    rates = sample_mask_rates(200_000, torch.Generator().manual_seed(0)).numpy()
    assert rates.min() >= 0 and rates.max() <= 1
    assert rates.mean() == pytest.approx(2 / math.pi, abs=0.005)  # mean 0.64
    # CDF of p(r) = 2/pi (1 - r^2)^-1/2 is 2/pi arcsin(r)
    result = stats.kstest(rates, lambda r: 2 / np.pi * np.arcsin(np.clip(r, 0, 1)))
    assert result.pvalue > 0.01
    # and it is not the uniform distribution
    assert stats.kstest(rates, "uniform").pvalue < 1e-6


def test_token_mask_masks_ceil_rate_times_n_and_at_least_one():
    rates = torch.tensor([0.0, 0.1, 0.5, 1.0])
    masked = random_token_mask(rates, 16, torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [1, 2, 8, 16]
    again = random_token_mask(rates, 16, torch.Generator().manual_seed(1))
    assert not torch.equal(masked, again)  # positions are random


def test_loss_counts_only_masked_positions():
    logits = torch.randn(2, 6, 5)
    targets = torch.randint(0, 5, (2, 6))
    masked = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    changed = logits.clone()
    changed[~masked] = 100.0
    assert masked_token_loss(logits, targets, masked) == pytest.approx(float(masked_token_loss(changed, targets, masked)))
    expected = torch.nn.functional.cross_entropy(logits[masked], targets[masked])
    assert float(masked_token_loss(logits, targets, masked)) == pytest.approx(float(expected))


def test_save_load_round_trip_and_one_line_errors(tmp_path):
    model = MaskedTransformer(SUPERRES).eval()
    save_generator(model, tmp_path / "g", extra={"sample": {"steps": 8}})
    loaded = load_generator(tmp_path / "g", expect=SUPERRES)
    inputs = _inputs(SUPERRES)
    assert torch.equal(model(*inputs), loaded(*inputs))
    with pytest.raises(ValueError, match="width 32 does not match the config's 64"):
        load_generator(tmp_path / "g", expect=MaskedTransformerSpec(**{**SUPERRES.to_dict(), "width": 64}))
    (tmp_path / "g" / "generator.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="generator.safetensors: corrupt or truncated"):
        load_generator(tmp_path / "g")
    with pytest.raises(ValueError, match="does not exist"):
        load_generator(tmp_path / "nowhere")


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [BASE, SUPERRES], ids=["base", "superres"])
def test_bf16_autocast_on_cuda_matches_fp32_on_cpu(spec):
    """What bf16-mixed training computes on a GPU: the same logits as fp32 on CPU within bf16's
    rounding, and finite fp32 gradients on the fp32 weights."""
    torch.manual_seed(0)
    model = MaskedTransformer(spec).eval()
    inputs = _inputs(spec, batch=4, seed=1)
    reference = model(*inputs).double()
    gpu = MaskedTransformer(spec).eval()
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda()
    on_gpu = [x.cuda() if x is not None else None for x in inputs]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = gpu(*on_gpu)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    error = (logits.double().cpu() - reference).norm() / reference.norm()
    assert error < 2e-2, f"relative error {error:.2e} vs fp32"
    tokens = inputs[0].cuda()
    masked = torch.rand(tokens.shape, device="cuda") < 0.5
    masked[:, 0] = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = masked_token_loss(gpu(*on_gpu).float(), tokens.clamp(max=spec.codebook_size - 1), masked)
    loss.backward()
    grads = [p.grad for p in gpu.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("spec", [BASE, SUPERRES], ids=["base", "superres"])
def test_bf16_autocast_on_cpu_runs_attention_in_fp32(spec, monkeypatch):
    """`precision: bf16-mixed` on a CPU: the linear layers run in bf16, but attention gets fp32 inputs
    outside autocast (the CPU kernels' bf16 backward is the slow part), and the logits stay within
    bf16's rounding of fp32 with finite fp32 gradients."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = MaskedTransformer(spec)
    inputs = _inputs(spec, batch=4, seed=1)
    reference = model(*inputs).double()
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(*inputs)
    assert seen and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen)
    assert logits.dtype == torch.bfloat16
    error = (logits.double() - reference).norm() / reference.norm()
    assert error < 2e-2, f"relative error {error:.2e} vs fp32"
    tokens = inputs[0].clamp(max=spec.codebook_size - 1)
    masked = torch.rand(tokens.shape) < 0.5
    masked[:, 0] = True
    masked_token_loss(logits.float(), tokens, masked).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
