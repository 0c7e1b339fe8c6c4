"""The domain evaluator network: features, CLIP score, contrastive loss, FID adapter, save/load."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.evaluator import (DomainEvaluator, EvaluatorFeatures, EvaluatorSpec, contrastive_loss, evaluator_digest,
                              load_evaluator, read_evaluator_meta, save_evaluator)

SPEC = EvaluatorSpec(resolution=16, channels=(8, 16, 16), embed_dim=12, text_dim=10)


def model(seed: int = 0, spec: EvaluatorSpec = SPEC) -> DomainEvaluator:
    torch.manual_seed(seed)
    return DomainEvaluator(spec).eval()


def text_batch(b: int, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (b, 1), generator=g)  # [B,L], >= 1 real token
    return torch.randn(b, length, SPEC.text_dim, generator=g), mask


def test_spec_validates_and_round_trips_through_its_dict():
    assert EvaluatorSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC  # channels come back a tuple
    for bad in ({"channels": ()}, {"embed_dim": 0}, {"resolution": 2}, {"channels": (8, 0)}):
        with pytest.raises(ValueError, match="evaluator spec") as err:
            EvaluatorSpec(**{**SPEC.to_dict(), **bad})
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown key 'depth'"):
        EvaluatorSpec.from_dict({**SPEC.to_dict(), "depth": 2})


@torch.no_grad()
def test_features_have_the_documented_shapes_and_unit_norm_and_ignore_padding():
    ev = model()
    images = torch.rand(4, 3, 16, 16)
    text, mask = text_batch(4)
    assert ev.pooled_features(images).shape == (4, 16)
    img, txt = ev.image_features(images), ev.text_features(text, mask)
    assert img.shape == txt.shape == (4, 12)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
    noisy = torch.where(mask[..., None], text, torch.randn_like(text) * 100)  # change only padded positions
    assert torch.allclose(ev.text_features(noisy, mask), txt, atol=1e-6)
    assert torch.allclose(ev.text_features(text, mask.float()), txt)  # 0/1 masks work like bool ones
    assert not torch.allclose(ev.text_features(text, torch.ones_like(mask)), txt)  # ... and padding would count


@torch.no_grad()
def test_images_of_another_size_are_resized_with_antialiasing_and_bad_shapes_are_refused():
    ev = model()
    big = torch.rand(2, 3, 40, 24)
    small = F.interpolate(big, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(ev.pooled_features(big), ev.pooled_features(small), atol=1e-6)
    assert not torch.allclose(ev.pooled_features(big), ev.pooled_features(big[..., :16, :16]))
    for bad in (torch.rand(2, 1, 16, 16), torch.rand(3, 16, 16), torch.zeros(2, 3, 16, 16, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"evaluator: expected float images \[B, 3, H, W\]") as err:
            ev.image_features(bad)
        assert "\n" not in str(err.value)


@torch.no_grad()
def test_clip_score_is_100_times_the_clamped_cosine_of_each_pair():
    ev = model()
    images, (text, mask) = torch.rand(8, 3, 16, 16), text_batch(8)
    score = ev.clip_score(images, text, mask)
    cosine = (ev.image_features(images) * ev.text_features(text, mask)).sum(-1)
    assert score.shape == (8,) and ((score >= 0) & (score <= 100)).all()
    assert torch.allclose(score, 100 * cosine.clamp(min=0), atol=1e-4)
    assert (cosine < 0).any() and (score[cosine < 0] == 0).all()  # random init: some pairs point away


def test_contrastive_loss_prefers_aligned_pairs_and_treats_duplicate_captions_as_positives():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(image + 0.1 * torch.randn(6, 8, generator=g), dim=-1)
    ids = torch.arange(6)
    aligned = contrastive_loss(image, text, 10.0, ids)
    assert aligned < contrastive_loss(image, text[torch.tensor([1, 2, 3, 4, 5, 0])], 10.0, ids)
    # items 0 and 1 share a caption: swapping their texts is no worse; with distinct ids it is
    swap = torch.tensor([1, 0, 2, 3, 4, 5])
    dup = torch.tensor([0, 0, 1, 2, 3, 4])
    assert torch.allclose(contrastive_loss(image, text[swap], 10.0, dup), contrastive_loss(image, text, 10.0, dup))
    assert contrastive_loss(image, text[swap], 10.0, ids) > aligned + 0.1
    # the target is spread over the positives: a text equidistant from its caption's two images is optimal
    tied = text.clone()
    tied[0] = tied[1] = F.normalize(image[0] + image[1], dim=-1)
    near0 = text.clone()
    near0[0] = near0[1] = F.normalize(0.8 * image[0] + 0.2 * image[1], dim=-1)
    assert contrastive_loss(image, tied, 10.0, dup) < contrastive_loss(image, near0, 10.0, dup)


def test_a_few_optimisation_steps_separate_matched_from_mismatched_pairs():
    spec = EvaluatorSpec(resolution=8, channels=(8, 16), embed_dim=8, text_dim=SPEC.text_dim)
    ev = model(spec=spec).train()
    g = torch.Generator().manual_seed(1)
    colours = torch.rand(4, 3, generator=g)  # caption k = "a patch of colour k"
    captions, mask = torch.randn(4, 3, spec.text_dim, generator=g), torch.ones(4, 3, dtype=torch.bool)
    ids = torch.arange(16) % 4  # [16]: every caption 4 times per batch

    def images() -> torch.Tensor:  # [16,3,8,8] noisy patches of each id's colour
        return (colours[ids][:, :, None, None] + 0.05 * torch.randn(16, 3, 8, 8, generator=g)).clamp(0, 1)

    @torch.no_grad()
    def similarity() -> torch.Tensor:  # [16 images, 4 captions]
        return ev.image_features(images()) @ ev.text_features(captions, mask).t()

    def gap(sim: torch.Tensor) -> float:  # mean cosine of matched pairs minus mismatched ones
        matched = F.one_hot(ids, 4).bool()
        return float(sim[matched].mean() - sim[~matched].mean())

    def accuracy(sim: torch.Tensor) -> float:  # image -> caption top-1
        return float((sim.argmax(1) == ids).float().mean())

    before = similarity()
    optimizer = torch.optim.Adam(ev.parameters(), lr=1e-2)
    for _ in range(60):
        loss = contrastive_loss(ev.image_features(images()), ev.text_features(captions[ids], mask[ids]), ev.scale, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = similarity()
    assert abs(gap(before)) < 0.1 and gap(after) > 0.4
    assert accuracy(before) <= 0.5 and accuracy(after) >= 0.9
    assert loss < math.log(16) - 1  # log(16): chance; the floor is log(16 / 4 positives)


def test_save_and_load_round_trip_gives_identical_outputs_and_the_meta(tmp_path):
    ev = model(3)
    meta = {"text_encoder_fingerprint": "abc", "data_digest": "def", "steps": 5}
    save_evaluator(ev, tmp_path / "ev", meta)
    loaded = load_evaluator(tmp_path / "ev")
    assert loaded.spec == SPEC and not loaded.training
    images, (text, mask) = torch.rand(3, 3, 16, 16), text_batch(3)
    with torch.no_grad():
        assert torch.equal(loaded.clip_score(images, text, mask), ev.clip_score(images, text, mask))
        assert torch.equal(loaded.pooled_features(images), ev.pooled_features(images))
    assert read_evaluator_meta(tmp_path / "ev") == meta
    digest = evaluator_digest(tmp_path / "ev")
    save_evaluator(model(4), tmp_path / "other", meta)
    assert evaluator_digest(tmp_path / "other") != digest and evaluator_digest(tmp_path / "ev") == digest


def test_a_corrupt_or_missing_file_is_a_one_line_error_naming_it(tmp_path):
    save_evaluator(model(), tmp_path / "ev", {})
    weights, spec = tmp_path / "ev" / "evaluator.safetensors", tmp_path / "ev" / "evaluator.json"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        load_evaluator(tmp_path / "ev")
    assert str(weights) in str(err.value) and "\n" not in str(err.value)
    weights.unlink()
    with pytest.raises(ValueError, match="evaluator.safetensors: missing"):
        load_evaluator(tmp_path / "ev")
    spec.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_evaluator(tmp_path / "ev")
    assert str(spec) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_evaluator(tmp_path / "nowhere")


def test_torchmetrics_fid_runs_on_the_evaluator_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    features = EvaluatorFeatures(model())
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    fid.train()
    assert not features.evaluator.training  # a fixed yardstick, whatever mode its owner is put in
    g = torch.Generator().manual_seed(0)

    def patches() -> torch.Tensor:  # [64,3,16,16]: flat patches of random colours, a little noise
        return (torch.rand(64, 3, 1, 1, generator=g) + 0.05 * torch.randn(64, 3, 16, 16, generator=g)).clamp(0, 1)

    real = patches()

    def fid_against(fake: torch.Tensor) -> float:
        fid.reset()
        fid.update(real, real=True)
        fid.update(fake, real=False)
        return float(fid.compute())

    same = fid_against(real)
    resampled = fid_against(patches())  # the same distribution, other images
    darker = fid_against(real * 0.5)
    assert abs(same) < 1e-9 and 0 < resampled < darker / 4  # a shift in colour, not sampling noise
    assert features(real).shape == (64, features.num_features) and not features(real).requires_grad
