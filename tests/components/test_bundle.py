"""The cascade bundle: one self-contained directory that rebuilds the smoke cascade."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from components.bundle import MANIFEST, load_bundle, write_bundle
from components.errors import BadInputError
from models.masked_transformer import read_generator_meta


def bundle_of(smoke_cascade, out: Path, decoder_dir: Path | None = None) -> Path:
    s = smoke_cascade
    return write_bundle(out, s.art.cfg, s.art.tokenizer, s.base, s.superres, decoder_dir)


@pytest.fixture(scope="module")
def bundle(smoke_cascade, tmp_path_factory) -> Path:
    return bundle_of(smoke_cascade, tmp_path_factory.mktemp("bundle") / "bundle")


def one_line_error(match: str, call) -> str:
    with pytest.raises(BadInputError, match=match) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_the_bundle_holds_only_specs_weights_and_the_manifest(bundle, smoke_cascade):
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, "base/generator.json", "base/generator.safetensors", "decoder/tokenizer.json",
                     "decoder/tokenizer.safetensors", "superres/generator.json", "superres/generator.safetensors",
                     "tokenizer/tokenizer.json", "tokenizer/tokenizer.safetensors"])
    manifest = json.loads((bundle / MANIFEST).read_text())
    cfg = smoke_cascade.art.cfg
    assert manifest["sample"] == {"base": asdict(cfg.base.sample), "superres": asdict(cfg.superres.sample)}
    trained_with = read_generator_meta(smoke_cascade.base)["text_encoder"]
    assert manifest["text_encoder"] == {k: trained_with[k] for k in ("kind", "path", "max_length", "fingerprint")}


def test_a_loaded_bundle_generates_deterministic_images_at_the_cascade_resolution(bundle, smoke_cascade):
    cascade = load_bundle(bundle)
    prompts = ["a red circle", "two blue squares"]
    images = cascade.generate(prompts, seed=5)
    side = smoke_cascade.art.cfg.tokenizer.superres.resolution
    assert images.shape == (2, 3, side, side) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, cascade.generate(prompts, seed=5))
    assert not torch.equal(images, cascade.generate(prompts, seed=6))


def test_the_decoder_comes_from_decoder_dir_when_given(smoke_cascade, tmp_path):
    finetuned = shutil.copytree(smoke_cascade.art.tokenizer / "superres", tmp_path / "decoder_ft")
    (finetuned / "tokenizer.safetensors").write_bytes(b"finetuned weights")  # recognisable, not loadable
    out = bundle_of(smoke_cascade, tmp_path / "bundle", decoder_dir=finetuned)
    assert (out / "decoder" / "tokenizer.safetensors").read_bytes() == b"finetuned weights"
    one_line_error("decoder/tokenizer.safetensors", lambda: load_bundle(out))


def test_missing_parts_are_one_line_errors_naming_the_file(smoke_cascade, bundle, tmp_path):
    one_line_error(r"nowhere/generator\.json: missing",
                   lambda: write_bundle(tmp_path / "b", smoke_cascade.art.cfg, smoke_cascade.art.tokenizer,
                                        smoke_cascade.base, tmp_path / "nowhere"))
    copy = shutil.copytree(bundle, tmp_path / "copy")
    (copy / "superres" / "generator.safetensors").unlink()
    one_line_error(r"superres/generator\.safetensors", lambda: load_bundle(copy))
    (copy / MANIFEST).unlink()
    one_line_error(rf"{MANIFEST}: missing", lambda: load_bundle(copy))


def test_a_different_text_encoder_is_refused(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "copy")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["text_encoder"]["fingerprint"] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(manifest))
    one_line_error("fingerprint mismatch", lambda: load_bundle(copy))
