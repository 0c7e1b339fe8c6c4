"""The features stage: encode each caption once, cache by caption hash, read back by key or caption."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch

from components import features
from components.config import FeaturesConfig, TextEncoderConfig, load_config
from components.errors import BadInputError
from components.features import FeatureStore, pack_path, run
from components.io import write_manifest
from models.text_encoder import FrozenTextEncoder

MAX_LENGTH = 16
CAPTIONS = [
    "two small red circles above a blue square",
    "a green triangle",
    "three large yellow stars left of a purple circle",
    "a green triangle",  # duplicate caption: encoded once, shared by two keys
    "one small orange square below a red triangle",
    "two blue circles",
]
N_UNIQUE = 5


def features_cfg(max_length: int = MAX_LENGTH, dtype: str = "float16", batch_size: int = 2) -> FeaturesConfig:
    return FeaturesConfig(
        encoder=TextEncoderConfig(kind="minilm", path=None, max_length=max_length, dtype=dtype), batch_size=batch_size
    )


def write_accepted(validate_dir: Path, captions: list[str], start: int = 0) -> list[str]:
    keys = [f"item-{i:04d}" for i in range(start, start + len(captions))]
    splits = ["train", "val", "test"] * len(captions)
    write_manifest(pd.DataFrame({"key": keys, "caption": captions, "split": splits[: len(captions)]}),
                   validate_dir / features.ACCEPTED_FILE)
    return keys


_loaded: dict[tuple, FrozenTextEncoder] = {}


@pytest.fixture(autouse=True)
def reuse_loaded_encoders(monkeypatch):
    """Load each encoder spec once per module (the suite would otherwise reload MiniLM per run); counts loads."""
    real = FrozenTextEncoder.from_spec.__func__
    loads = []

    def from_spec(cls, kind, path, max_length, device="cpu"):
        loads.append((kind, max_length))
        spec = (kind, path, max_length, device)
        if spec not in _loaded:
            _loaded[spec] = real(cls, kind, path, max_length, device)
        return _loaded[spec]

    monkeypatch.setattr(FrozenTextEncoder, "from_spec", classmethod(from_spec))
    return loads


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    return tmp_path / "validate", tmp_path / "features"


def test_first_run_encodes_each_unique_caption_once(dirs):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    seen = []
    result = run(features_cfg(), validate_dir, out_dir, progress=seen.append)

    assert (result.n_items, result.n_unique_captions, result.n_encoded, result.n_cache_hits) == (6, N_UNIQUE, N_UNIQUE, 0)
    assert result.dim == 384 and result.n_packs == 1 and result.rebuilt_because is None
    assert seen == [2, 4, 5]  # captions encoded so far, per batch of 2
    assert set(result.metrics) >= {"n_items", "n_encoded", "n_cache_hits", "seconds", "mean_tokens"}

    meta = json.loads((out_dir / features.ENCODER_FILE).read_text())
    assert meta == {"kind": "minilm", "path": None, "max_length": MAX_LENGTH, "dtype": "float16", "dim": 384,
                    "fingerprint": result.fingerprint}
    from safetensors.torch import load_file

    pack = load_file(pack_path(out_dir, 0))
    assert pack["embeddings"].shape == (N_UNIQUE, MAX_LENGTH, 384) and pack["embeddings"].dtype == torch.float16
    assert pack["mask"].shape == (N_UNIQUE, MAX_LENGTH) and pack["mask"].dtype == torch.bool
    index = pd.read_parquet(out_dir / features.INDEX_FILE)
    assert index["caption_sha256"].is_unique and len(index) == N_UNIQUE
    assert index.set_index("caption_sha256").loc[features.caption_sha256("a green triangle"), "n_tokens"] == 5
    items = pd.read_parquet(out_dir / features.ITEMS_FILE)
    assert items["key"].tolist() == keys and list(items.columns) == ["key", "split", "caption_sha256"]
    assert items["caption_sha256"].iloc[1] == items["caption_sha256"].iloc[3]


def test_second_run_encodes_nothing_and_never_loads_the_encoder(dirs, reuse_loaded_encoders):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    run(features_cfg(), validate_dir, out_dir)
    before = FeatureStore.open(out_dir).lookup(keys)
    pack_bytes = pack_path(out_dir, 0).read_bytes()
    reuse_loaded_encoders.clear()

    result = run(features_cfg(), validate_dir, out_dir)
    assert (result.n_encoded, result.n_cache_hits) == (0, N_UNIQUE)
    assert reuse_loaded_encoders == []  # the cache speedup: no model load at all
    after = FeatureStore.open(out_dir).lookup(keys)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert pack_path(out_dir, 0).read_bytes() == pack_bytes


def test_new_captions_are_encoded_into_a_new_pack(dirs):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    run(features_cfg(), validate_dir, out_dir)
    old = FeatureStore.open(out_dir).lookup(keys)
    pack_bytes = pack_path(out_dir, 0).read_bytes()

    added = ["a purple star above a green square", "a green triangle"]  # one new, one cached
    all_keys = write_accepted(validate_dir, CAPTIONS + added)
    result = run(features_cfg(), validate_dir, out_dir)
    assert (result.n_encoded, result.n_cache_hits, result.n_packs) == (1, N_UNIQUE, 2)
    assert pack_path(out_dir, 1).is_file() and pack_path(out_dir, 0).read_bytes() == pack_bytes
    store = FeatureStore.open(out_dir)
    emb, mask = store.lookup(keys)
    assert torch.equal(emb, old[0]) and torch.equal(mask, old[1])
    assert torch.equal(store.lookup([all_keys[-1]])[0], store.lookup([keys[1]])[0])


def test_changing_max_length_or_dtype_rebuilds_the_cache(dirs):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    first = run(features_cfg(), validate_dir, out_dir)

    result = run(features_cfg(max_length=8), validate_dir, out_dir)
    assert "max_length changed (16 -> 8)" in result.rebuilt_because
    assert (result.n_encoded, result.n_packs) == (N_UNIQUE, 1) and result.fingerprint != first.fingerprint
    assert FeatureStore.open(out_dir).lookup(keys)[0].shape == (6, 8, 384)

    result = run(features_cfg(max_length=8, dtype="float32"), validate_dir, out_dir)
    assert "dtype changed" in result.rebuilt_because and result.n_encoded == N_UNIQUE
    assert sorted(p.name for p in (out_dir / features.PACKS_DIR).iterdir()) == ["pack-00000.safetensors"]


def test_store_matches_direct_encoding(dirs):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    run(features_cfg(), validate_dir, out_dir)
    store = FeatureStore.open(out_dir)
    direct_emb, direct_mask = FrozenTextEncoder.from_spec("minilm", None, MAX_LENGTH).encode(CAPTIONS)

    emb, mask = store.lookup(keys)
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(mask, direct_mask)
    torch.testing.assert_close(emb, direct_emb, atol=2e-3, rtol=2e-3)  # stored as float16
    by_caption = store.by_caption(CAPTIONS)
    assert torch.equal(by_caption[0], emb) and torch.equal(by_caption[1], mask)
    # Any order, repeats, and a single item across the pack work the same.
    reordered, _ = store.lookup([keys[4], keys[0], keys[4]])
    assert torch.equal(reordered, emb[[4, 0, 4]])


def test_store_reader_api(dirs):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    run(features_cfg(), validate_dir, out_dir)
    store = FeatureStore.open(out_dir)
    assert (len(store), store.dim, store.max_length) == (6, 384, MAX_LENGTH)
    assert store.keys() == keys and store.keys("val") == [keys[1], keys[4]]
    store.lookup(keys[:1])  # opens a pack handle
    clone = pickle.loads(pickle.dumps(store))  # as DataLoader workers receive it
    assert torch.equal(clone.lookup(keys)[0], store.lookup(keys)[0])
    with pytest.raises(KeyError, match="'nope'"):
        store.lookup(["nope"])
    with pytest.raises(KeyError, match="never seen"):
        store.by_caption(["never seen"])
    assert store.lookup([])[0].shape == (0, MAX_LENGTH, 384)


def test_killed_run_leftovers_are_repaired(dirs):
    validate_dir, out_dir = dirs
    keys = write_accepted(validate_dir, CAPTIONS)
    run(features_cfg(), validate_dir, out_dir)
    expected = FeatureStore.open(out_dir).lookup(keys)
    orphan = pack_path(out_dir, 7)
    orphan.write_bytes(b"half-written")  # a pack written but never indexed
    pack_path(out_dir, 0).unlink()  # an indexed pack lost

    result = run(features_cfg(), validate_dir, out_dir)
    assert result.n_encoded == N_UNIQUE and not orphan.exists()
    emb, mask = FeatureStore.open(out_dir).lookup(keys)
    assert torch.equal(mask, expected[1])
    torch.testing.assert_close(emb, expected[0], atol=2e-3, rtol=2e-3)  # fp16-level drift at most

    (out_dir / features.ENCODER_FILE).write_text("{not json")
    assert "encoder.json is unreadable" in run(features_cfg(), validate_dir, out_dir).rebuilt_because


def test_missing_accepted_manifest(dirs):
    validate_dir, out_dir = dirs
    with pytest.raises(BadInputError, match="run the validate stage first"):
        run(features_cfg(), validate_dir, out_dir)
    with pytest.raises(BadInputError, match="run the features stage first"):
        FeatureStore.open(out_dir)


def test_null_caption_is_rejected(dirs):
    validate_dir, out_dir = dirs
    write_accepted(validate_dir, ["a red circle", None])
    with pytest.raises(BadInputError, match="1 accepted item.*no caption.*item-0001.*quarantined"):
        run(features_cfg(), validate_dir, out_dir)


def test_bad_encoder_path_is_a_bad_input(dirs):
    validate_dir, out_dir = dirs
    write_accepted(validate_dir, CAPTIONS)
    cfg = FeaturesConfig(encoder=TextEncoderConfig(kind="t5", path="/no/such/t5", max_length=8, dtype="float16"),
                         batch_size=2)
    with pytest.raises(BadInputError, match="features.encoder: text encoder 't5' at /no/such/t5"):
        run(cfg, validate_dir, out_dir)


def test_execute_records_metrics(dirs, tmp_path, mlflow_uri):
    validate_dir, out_dir = dirs
    write_accepted(validate_dir, CAPTIONS)
    cfg = load_config(overrides={"features.encoder.max_length": MAX_LENGTH})
    result = features.execute(cfg, validate_dir, out_dir, tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text())["n_encoded"] == result.n_encoded == N_UNIQUE
