"""Stage `tokens`: content-addressed precomputed codes, aligned with the manifest and the text features."""

import json
import shutil

import pandas as pd
import pytest
import torch

from components import tokens
from components.errors import BadInputError
from components.images import ShardImageDataset
from components.tokenizer import read_accepted
from models.tokenizer import load_tokenizer


@pytest.fixture
def tokens_dir(smoke_artifacts, tmp_path):
    art = smoke_artifacts
    out = tmp_path / "tokens"
    result = tokens.run(art.cfg.tokens, art.data, art.validate, art.tokenizer, out, art.features)
    assert result.encoded == ("base", "superres") and result.reused == ()
    return out


def test_codes_are_uint16_grids_aligned_with_manifest_and_features(smoke_artifacts, tokens_dir):
    art = smoke_artifacts
    accepted = read_accepted(art.validate)
    keys = pd.read_parquet(tokens_dir / tokens.KEYS_FILE)
    assert keys["key"].tolist() == accepted["key"].tolist()
    assert keys["key"].tolist() == pd.read_parquet(art.features / "items.parquet")["key"].tolist()
    store = tokens.TokenStore(tokens_dir)
    for which in ("base", "superres"):
        meta = json.loads((tokens_dir / which / tokens.META_FILE).read_text())
        grid = getattr(art.cfg.tokenizer, which).resolution // getattr(art.cfg.tokenizer, which).downsample
        assert meta["dtype"] == "uint16" and meta["shape"] == [len(accepted), grid, grid]
        codes = store.lookup(which, accepted["key"].tolist()[:5])
        assert codes.shape == (5, grid, grid) and int(codes.max()) < meta["codebook_size"]


def test_stored_codes_equal_encoding_the_images_directly(smoke_artifacts, tokens_dir):
    art = smoke_artifacts
    model = load_tokenizer(art.tokenizer / "superres")
    accepted = read_accepted(art.validate).iloc[[3, 0, 7]]
    images = ShardImageDataset(art.data, accepted, model.spec.resolution)
    with torch.inference_mode():
        direct = model.encode(torch.stack([images[i] for i in range(3)]))
    assert torch.equal(tokens.TokenStore(tokens_dir).lookup("superres", accepted["key"].tolist()), direct)


def test_rerun_with_same_inputs_reuses_and_a_new_tokenizer_reencodes(smoke_artifacts, tokens_dir, tmp_path):
    art = smoke_artifacts
    again = tokens.run(art.cfg.tokens, art.data, art.validate, art.tokenizer, tokens_dir, art.features)
    assert again.encoded == () and again.reused == ("base", "superres")

    changed = tmp_path / "tokenizer"
    shutil.copytree(art.tokenizer, changed)
    from models.tokenizer import save_tokenizer

    model = load_tokenizer(changed / "base")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_tokenizer(model, changed / "base")
    third = tokens.run(art.cfg.tokens, art.data, art.validate, changed, tokens_dir, art.features)
    assert third.encoded == ("base",) and third.reused == ("superres",)


def test_corrupt_or_missing_tokenizer_is_one_line_naming_the_file(smoke_artifacts, tmp_path):
    art = smoke_artifacts
    broken = tmp_path / "tokenizer"
    shutil.copytree(art.tokenizer, broken)
    weights = broken / "base" / "tokenizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BadInputError, match="tokenizer.safetensors") as err:
        tokens.run(art.cfg.tokens, art.data, art.validate, broken, tmp_path / "out")
    assert "\n" not in str(err.value)
    shutil.rmtree(broken / "superres")
    (broken / "base" / "tokenizer.safetensors").write_bytes((art.tokenizer / "base" / "tokenizer.safetensors").read_bytes())
    with pytest.raises(BadInputError, match="superres"):
        tokens.run(art.cfg.tokens, art.data, art.validate, broken, tmp_path / "out")


def test_features_for_another_accepted_set_are_refused(smoke_artifacts, tmp_path):
    art = smoke_artifacts
    features = tmp_path / "features"
    shutil.copytree(art.features, features)
    items = pd.read_parquet(features / "items.parquet")
    items.iloc[1:].to_parquet(features / "items.parquet")
    with pytest.raises(BadInputError, match="different accepted set"):
        tokens.run(art.cfg.tokens, art.data, art.validate, art.tokenizer, tmp_path / "out", features)


def test_kl_tokenizers_train_and_store_float16_latents(smoke_artifacts, tmp_path):
    from dataclasses import replace

    from components import tokenizer

    art = smoke_artifacts
    cfg = replace(art.cfg.tokenizer, kind="kl", train=replace(art.cfg.tokenizer.train, steps=4, disc_start=10**6))
    result = tokenizer.run(cfg, art.data, art.validate, tmp_path / "tok", tmp_path / "ckpt")
    assert {"psnr", "l1"} <= set(result.per_tokenizer["base"]) and "codebook_usage" not in result.per_tokenizer["base"]
    out = tmp_path / "tokens"
    tokens.run(art.cfg.tokens, art.data, art.validate, tmp_path / "tok", out, art.features)
    meta = json.loads((out / "base" / tokens.META_FILE).read_text())
    assert meta["kind"] == "kl" and meta["dtype"] == "float16"
    latents = tokens.TokenStore(out).lookup("base", read_accepted(art.validate)["key"].tolist()[:2])
    spec = cfg.base
    assert latents.dtype == torch.float32 and latents.shape[-1] == spec.resolution // spec.downsample
