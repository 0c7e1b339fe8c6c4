"""models.tokenizer: shapes, spec validation, save/load round trip and errors, dead-code restarts,
larger decoders."""

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.tokenizer import (
    ImageTokenizer,
    TokenizerSpec,
    codebook_stats,
    frozen_parameter_names,
    load_tokenizer,
    save_tokenizer,
    tokenizer_digest,
    with_larger_decoder,
)

# tiny specs: 16 px, one downsampling (f2) -> 8x8 tokens
VQ = TokenizerSpec("vqgan", 16, 2, (8, 16), 1, 4, 32, norm_groups=4)
KL = TokenizerSpec("kl", 16, 2, (8, 16), 1, 4, 0, norm_groups=4)


def images(n=2, r=16, seed=0):
    return torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return ImageTokenizer(VQ).eval()


@pytest.mark.parametrize("quantizer", ["l2", "euclidean"])
def test_vqgan_shapes(quantizer):
    torch.manual_seed(0)
    spec = dataclasses.replace(VQ, quantizer=quantizer, codebook_dim=3)
    model = ImageTokenizer(spec)
    x = images()
    out = model(x)
    assert out.recon.shape == (2, 3, 16, 16)
    assert out.reg_loss.ndim == 0 and out.reg_loss >= 0
    assert out.indices.shape == (2, 8, 8) and out.indices.dtype == torch.long
    assert out.latents.shape == (2, 3, 8, 8)  # lookup space: codebook_dim
    idx = model.encode(x)
    assert idx.shape == (2, 8, 8) and idx.dtype == torch.long
    assert 0 <= int(idx.min()) and int(idx.max()) < 32
    assert torch.equal(idx, out.indices)
    assert model.decode(idx).shape == (2, 3, 16, 16)
    assert model.is_vq and model.codebook_size == 32
    assert model.last_decoder_weight() is model.vq.decoder.conv_out.weight
    out.recon.mean().backward()  # straight-through: the encoder gets gradients
    assert model.vq.encoder.conv_in.weight.grad is not None


def test_vqgan_decode_of_encode_matches_forward(vq):
    x = images()
    with torch.no_grad():
        assert torch.allclose(vq(x).recon, vq.decode(vq.encode(x)), atol=1e-5)


def test_kl_shapes():
    torch.manual_seed(0)
    model = ImageTokenizer(KL).eval()
    out = model(images())
    assert out.recon.shape == (2, 3, 16, 16) and out.indices is None
    assert out.latents.shape == (2, 4, 8, 8) and out.reg_loss.ndim == 0 and out.reg_loss >= 0
    z = model.encode(images())
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert model.decode(z).shape == (2, 3, 16, 16)
    assert not model.is_vq and model.codebook_size == 0


def test_wrong_image_shape_is_one_line_error(vq):
    with pytest.raises(ValueError, match=r"\[B,3,16,16\]") as e:
        vq(torch.zeros(1, 3, 32, 32))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="indices"):
        vq.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vq.decode(torch.full((1, 8, 8), 32))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(channels=(8, 16, 16)), "len\\(channels\\)"),
        (dict(downsample=3), "power of two"),
        (dict(resolution=18, downsample=4, channels=(8, 8, 16)), "not divisible"),
        (dict(codebook_size=65537), "65536"),
        (dict(kind="vae"), "kind"),
        (dict(norm_groups=3), "norm_groups"),
        (dict(quantizer="cosine"), "quantizer"),
        (dict(kind="kl"), "codebook_size must be 0"),
    ],
)
def test_spec_validation(change, message):
    with pytest.raises(ValueError, match=message) as e:
        dataclasses.replace(VQ, **change)
    assert "\n" not in str(e.value)


def test_spec_dict_round_trip():
    assert TokenizerSpec.from_dict(VQ.to_dict()) == VQ
    assert VQ.grid == 8
    d = VQ.to_dict()
    d["channels"] = [8, 16]  # JSON gives lists
    assert TokenizerSpec.from_dict(d) == VQ
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        TokenizerSpec.from_dict({**d, "colour": 1})
    with pytest.raises(ValueError, match="resolution"):
        TokenizerSpec.from_dict({k: v for k, v in d.items() if k != "resolution"})


@pytest.mark.parametrize("spec", [VQ, KL], ids=["vqgan", "kl"])
def test_save_load_round_trip(tmp_path, spec):
    torch.manual_seed(0)
    model = ImageTokenizer(spec).eval()
    path = save_tokenizer(model, tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.safetensors" and (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "tok", expect=spec)
    assert not loaded.training and loaded.spec == spec
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x).recon, loaded(x).recon)
        assert torch.equal(model.encode(x), loaded.encode(x))
    digest = tokenizer_digest(tmp_path / "tok")
    assert len(digest) == 64 and digest == tokenizer_digest(tmp_path / "tok")


@pytest.fixture
def saved(tmp_path, vq):
    save_tokenizer(vq, tmp_path / "tok")
    return tmp_path / "tok"


def _one_line_error(directory, match, **kw):
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(directory, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_load_missing_files(saved, tmp_path):
    _one_line_error(tmp_path / "nowhere", "nowhere: tokenizer directory does not exist")
    (saved / "tokenizer.safetensors").unlink()
    _one_line_error(saved, "tokenizer.safetensors: missing")
    (saved / "tokenizer.json").unlink()
    _one_line_error(saved, "tokenizer.json: missing")


def test_load_bad_json(saved):
    (saved / "tokenizer.json").write_text("{not json")
    _one_line_error(saved, "tokenizer.json: not valid JSON")


def test_load_corrupt_and_truncated_safetensors(saved):
    weights = saved / "tokenizer.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _one_line_error(saved, "tokenizer.safetensors: corrupt or truncated")
    weights.write_bytes(b"\x00garbage" * 10)
    _one_line_error(saved, "tokenizer.safetensors: corrupt or truncated")


def test_load_expect_mismatch_names_the_field(saved):
    msg = _one_line_error(saved, "codebook_size", expect=dataclasses.replace(VQ, codebook_size=64))
    assert msg.endswith("tokenizer.json: codebook_size 32 does not match the config's 64")


def test_load_wrong_shapes_and_keys(saved):
    weights = saved / "tokenizer.safetensors"
    state = load_file(str(weights))
    state["vq.quantize.embedding.weight"] = torch.zeros(64, 4)
    save_file(state, str(weights))
    _one_line_error(saved, r"tokenizer.safetensors: vq.quantize.embedding.weight has shape \[64, 4\]")
    del state["vq.quantize.embedding.weight"]
    save_file(state, str(weights))
    _one_line_error(saved, "tokenizer.safetensors: .*missing key 'vq.quantize.embedding.weight'")


@pytest.mark.parametrize("quantizer", ["l2", "euclidean"])
def test_restart_dead_codes_revives_only_dead_rows(quantizer):
    torch.manual_seed(0)
    spec = dataclasses.replace(VQ, quantizer=quantizer)
    model = ImageTokenizer(spec)
    K = spec.codebook_size
    # collapse: all codes identical except code 0 -> every token maps to one code
    with torch.no_grad():
        model.codebook.data[:] = torch.ones(K, 4)
        model.codebook.data[0] = torch.ones(4) * 2
    x = images(4)
    with torch.no_grad():
        out = model(x)
    usage = torch.bincount(out.indices.flatten(), minlength=K).float()
    assert codebook_stats(out.indices, K)[0] == 1 / K
    live = int(out.indices.flatten()[0])
    before = model.codebook.detach().clone()
    latents = out.latents.permute(0, 2, 3, 1).reshape(-1, 4)  # [N,D]
    n = model.restart_dead_codes(latents, usage)
    assert n == K - 1
    after = model.codebook.detach()
    dead = torch.arange(K) != live
    assert torch.equal(after[live], before[live])  # the live code is untouched
    assert not torch.isclose(after[dead], before[dead]).all(dim=1).any()  # every dead row moved
    with torch.no_grad():
        used, _ = codebook_stats(model.encode(x), K)
    assert used > 4 / K
    assert model.restart_dead_codes(latents, torch.ones(K)) == 0


def test_restarts_seed_codes_where_the_live_codes_fit_worst():
    torch.manual_seed(0)
    model = ImageTokenizer(VQ)  # euclidean, 32 codes of dim 4
    K = VQ.codebook_size
    with torch.no_grad():
        model.codebook.data[0] = 0.0  # the one live code: "background" at the origin
    background = torch.randn(990, 4) * 1e-3  # 99% of latents sit on the live code
    edges = torch.randn(10, 4) + 5.0  # 1% are far from it
    usage = torch.zeros(K)
    usage[0] = 1000
    model.restart_dead_codes(torch.cat([background, edges]), usage)
    restarted = model.codebook.detach()[1:]
    near_edges = (restarted - 5.0).norm(dim=1) < 4  # uniform draws would put ~1% of them here
    assert near_edges.float().mean() > 0.9


def test_restart_rejects_kl_and_bad_shapes(vq):
    with pytest.raises(ValueError, match="vqgan"):
        ImageTokenizer(KL).restart_dead_codes(torch.zeros(4, 4), torch.zeros(32))
    with pytest.raises(ValueError, match="latents"):
        vq.restart_dead_codes(torch.zeros(4, 5), torch.zeros(32))


def test_codebook_stats_known_histograms():
    K = 16
    uniform = torch.arange(K).repeat(3)
    used, ppl = codebook_stats(uniform, K)
    assert used == 1.0 and math.isclose(ppl, K, rel_tol=1e-9)
    used, ppl = codebook_stats(torch.zeros(10, dtype=torch.long), K)
    assert used == 1 / K and math.isclose(ppl, 1.0)
    used, ppl = codebook_stats(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), K)  # 4 codes equally
    assert used == 0.25 and math.isclose(ppl, 4.0, rel_tol=1e-9)


# --- a larger decoder (Muse decoder finetuning) ---------------------------------------------------

BIG = dataclasses.replace(VQ, decoder_channels=(16, 32), decoder_layers_per_block=2)


def test_spec_decoder_fields_round_trip(tmp_path):
    d = BIG.to_dict()
    assert d["decoder_channels"] == [16, 32] and d["decoder_layers_per_block"] == 2
    assert TokenizerSpec.from_dict(d) == BIG
    assert (BIG.decoder_widths, BIG.decoder_depth) == ((16, 32), 2)
    assert (VQ.decoder_widths, VQ.decoder_depth) == ((8, 16), 1)  # empty / 0: the encoder's
    torch.manual_seed(0)
    save_tokenizer(ImageTokenizer(BIG), tmp_path / "big")
    assert load_tokenizer(tmp_path / "big", expect=BIG).spec == BIG


def test_spec_saved_before_decoder_fields_still_loads(saved):
    import json

    meta = json.loads((saved / "tokenizer.json").read_text())
    for key in ("decoder_channels", "decoder_layers_per_block"):
        del meta["spec"][key]
    (saved / "tokenizer.json").write_text(json.dumps(meta))
    loaded = load_tokenizer(saved, expect=VQ)
    assert loaded.spec.decoder_channels == () and loaded.spec.decoder_layers_per_block == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(decoder_channels=(16, 32, 32)), "decoder_channels needs 2 entries"),
        (dict(decoder_channels=(16, 30)), "decoder_channels entry must be a positive multiple of norm_groups 4"),
        (dict(decoder_channels=(0, 16)), "norm_groups"),
        (dict(decoder_layers_per_block=-1), "decoder_layers_per_block"),
    ],
)
def test_spec_decoder_validation(change, message):
    with pytest.raises(ValueError, match=message) as e:
        dataclasses.replace(VQ, **change)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", [VQ, KL], ids=["vqgan", "kl"])
def test_with_larger_decoder_copies_the_code_side_exactly(spec):
    torch.manual_seed(0)
    source = ImageTokenizer(spec).eval()
    big = with_larger_decoder(source, (16, 32), 2).eval()
    assert big.spec == dataclasses.replace(spec, decoder_channels=(16, 32), decoder_layers_per_block=2)
    old, new = source.state_dict(), big.state_dict()
    prefix = "vq." if spec.kind == "vqgan" else "vae."
    frozen = frozen_parameter_names(big)
    assert frozen == frozen_parameter_names(source)
    assert {n.split(".")[1] for n in frozen} == ({"encoder", "quant_conv", "quantize"} if spec.kind == "vqgan"
                                                 else {"encoder", "quant_conv"})
    for name in [*frozen, prefix + "post_quant_conv.weight", prefix + "post_quant_conv.bias"]:
        assert torch.equal(old[name], new[name]), name
    # the encoder side keeps the normal tokenizer's key layout; only the decoder grew
    assert {k for k in old if ".decoder." not in k} == {k for k in new if ".decoder." not in k}
    count = lambda m: sum(p.numel() for p in m.net.decoder.parameters())  # noqa: E731
    assert count(big) > 2 * count(source)
    assert len(big.net.decoder.up_blocks[0].resnets) == 3  # layers_per_block + 1, as in diffusers
    x = images()
    with torch.no_grad():
        codes = source.encode(x)
        assert torch.equal(big.encode(x), codes)
        assert big.decode(codes).shape == source.decode(codes).shape == (2, 3, 16, 16)


def test_with_larger_decoder_rejects_wrong_or_smaller_decoders(vq):
    with pytest.raises(ValueError, match="need 2 entries"):
        with_larger_decoder(vq, (16, 32, 64), 2)
    with pytest.raises(ValueError, match="must not be smaller"):
        with_larger_decoder(vq, (4, 16), 2)
    with pytest.raises(ValueError, match="must not be smaller"):
        with_larger_decoder(vq, (16, 32), 0)
    with pytest.raises(ValueError, match="norm_groups"):
        with_larger_decoder(vq, (16, 34), 2)
