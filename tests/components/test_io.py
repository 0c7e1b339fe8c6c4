import io
import tarfile

import pytest
from PIL import Image

from components.io import (
    MANIFEST_COLUMNS, Sample, ShardWriter, frame_digest, header_size, read_items, read_manifest,
)


def _png(colour="red", size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _write(root, n=5, shard_size=2):
    with ShardWriter(root, shard_size) as writer:
        for i in range(n):
            writer.write(Sample(key=f"{i:09d}", split="train" if i < 3 else "val", image=_png(), image_ext="png",
                                caption=f"item {i}".encode(), meta={"i": i}, source=f"src{i}"))


def test_shards_roll_over_per_split_and_manifest_has_the_schema(tmp_path):
    _write(tmp_path)
    manifest = read_manifest(tmp_path)
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["shard"].unique()) == [
        "shards/train-000000.tar", "shards/train-000001.tar", "shards/val-000000.tar"]
    assert manifest.loc[0, "width"] == 8 and manifest.loc[0, "height"] == 6
    assert manifest["ingest_error"].isna().all()


def test_read_items_returns_the_raw_bytes(tmp_path):
    _write(tmp_path)
    items = list(read_items(tmp_path, read_manifest(tmp_path)))
    assert len(items) == 5
    row, members = items[0]
    assert members["png"] == _png() and members["txt"] == b"item 0"
    assert set(members) == {"png", "txt", "json"}


def test_shards_are_byte_identical_across_runs(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    for shard in ("train-000000.tar", "val-000000.tar"):
        assert (tmp_path / "a/shards" / shard).read_bytes() == (tmp_path / "b/shards" / shard).read_bytes()
    assert frame_digest(read_manifest(tmp_path / "a")) == frame_digest(read_manifest(tmp_path / "b"))


def test_shard_members_are_plain_files_in_img2dataset_layout(tmp_path):
    _write(tmp_path, n=1)
    with tarfile.open(tmp_path / "shards/train-000000.tar") as tar:
        assert tar.getnames() == ["000000000.png", "000000000.txt", "000000000.json"]
        assert all(m.isfile() and m.mtime == 0 for m in tar.getmembers())


def test_bad_keys_and_splits_are_refused(tmp_path):
    with ShardWriter(tmp_path, 2) as writer:
        writer.write(Sample(key="a", split="train", image=None, image_ext=None, caption=None))
        with pytest.raises(ValueError, match="duplicated or not a plain file stem"):
            writer.write(Sample(key="a", split="train", image=None, image_ext=None, caption=None))
        with pytest.raises(ValueError, match="duplicated or not a plain file stem"):
            writer.write(Sample(key="../x", split="train", image=None, image_ext=None, caption=None))
        with pytest.raises(ValueError, match="split must be one of"):
            writer.write(Sample(key="b", split="holdout", image=None, image_ext=None, caption=None))


def test_header_size_never_decodes_and_survives_garbage():
    assert header_size(_png(size=(3, 4))) == (3, 4)
    assert header_size(b"not an image") == (None, None)


def test_read_manifest_explains_a_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="cascade ingest"):
        read_manifest(tmp_path)
