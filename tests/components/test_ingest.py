"""components.ingest: every layout, hostile tars, fsspec sources, deterministic keys and splits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pytest
from PIL import Image

from components.errors import BadInputError
from components.ingest import detect_kind, ingest, summarize
from components.io import frame_digest, read_items, read_manifest


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    """A tiny, distinct image per i."""
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 5, 8), (i % 256, (3 * i) % 256, 100)).save(buf, format=fmt)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def img2dataset_members(start: int, count: int) -> list[tuple[str, bytes]]:
    """img2dataset layout: KEY.jpg, KEY.txt, KEY.json with a global 9-digit key."""
    members = []
    for i in range(start, start + count):
        key = f"{i:09d}"
        members += [
            (f"{key}.jpg", image_bytes(i, "JPEG")),
            (f"{key}.txt", f"caption {i}".encode()),
            (f"{key}.json", json.dumps({"key": key, "url": f"http://x/{i}.jpg", "status": "success"}).encode()),
        ]
    return members


def ingest_into(source: str | Path, out: Path, val: float = 0.1, test: float = 0.1, shard_size: int = 50):
    result = ingest(str(source), out, shard_size=shard_size, val_fraction=val, test_fraction=test)
    return result, read_manifest(out)


def payloads(out: Path, manifest: pd.DataFrame) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """key -> (row, {suffix: bytes}) read back through the shared IO helpers."""
    return {row["key"]: (row, members) for row, members in read_items(out, manifest)}


def rows_by_source(manifest: pd.DataFrame) -> dict[str, dict]:
    """source -> row, with missing values as None (pandas reads null strings back as NaN)."""
    rows = manifest.astype(object).where(manifest.notna(), None).to_dict("records")
    return {row["source"]: row for row in rows}


@pytest.fixture
def memory_root():
    """A unique folder in fsspec's process-wide memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/ingest-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- webdataset ----------------------------------------------------------------------------


@pytest.fixture
def webdataset_dir(tmp_path: Path) -> Path:
    shards = tmp_path / "wds"
    shards.mkdir()
    # Written out of name order, to check that tars are read sorted by name.
    (shards / "00001.tar").write_bytes(tar_bytes(img2dataset_members(100, 100)))
    (shards / "00000.tar").write_bytes(tar_bytes(img2dataset_members(0, 100)))
    (shards / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the tars
    return shards


def test_webdataset_dir_items_captions_meta_and_bytes(webdataset_dir: Path, tmp_path: Path):
    assert detect_kind(str(webdataset_dir)) == "webdataset"
    result, manifest = ingest_into(webdataset_dir, tmp_path / "out")

    assert (result.kind, result.n_items, result.n_with_errors) == ("webdataset", 200, 0)
    assert list(manifest["key"]) == [f"{i:09d}" for i in range(200)]
    assert list(manifest["source"][:2]) == ["00000.tar:000000000", "00000.tar:000000001"]
    assert manifest["source"].iloc[150] == "00001.tar:000000150"
    assert manifest["ingest_error"].isna().all()
    for key, (row, members) in payloads(tmp_path / "out", manifest).items():
        i = int(row["source"].rsplit(":", 1)[1])
        assert members["jpg"] == image_bytes(i, "JPEG")
        assert members["txt"] == f"caption {i}".encode()
        assert json.loads(members["json"])["source_meta"]["url"] == f"http://x/{i}.jpg"
        assert row["caption"] == f"caption {i}"


def test_webdataset_split_is_deterministic_and_follows_fractions(webdataset_dir: Path, tmp_path: Path):
    first, manifest = ingest_into(webdataset_dir, tmp_path / "a", val=0.2, test=0.1)
    # A different shard size changes the shard files, never which split an item lands in.
    _, again = ingest_into(webdataset_dir, tmp_path / "b", val=0.2, test=0.1, shard_size=7)
    _, same = ingest_into(webdataset_dir, tmp_path / "c", val=0.2, test=0.1)

    assert list(again["split"]) == list(manifest["split"])
    assert frame_digest(same) == frame_digest(manifest)
    counts = first.split_counts
    assert sum(counts.values()) == 200
    # Binomial(200, p): within ~3.5 standard deviations of the expected count.
    assert abs(counts["test"] - 20) <= 15 and abs(counts["val"] - 40) <= 20
    assert first.metrics["n_split_val"] == counts["val"]


def test_hostile_tar_members_become_error_rows_and_nothing_is_written_outside(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    good = image_bytes(1)
    evil = image_bytes(2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), link
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("good.png", data=good)
        add("good.txt", data=b"a good caption")
        add("../../evil.png", data=evil)
        add("/etc/x.png", data=evil)
        add("link.png", tarfile.SYMTYPE, link="/etc/passwd")
        add("hard.png", tarfile.LNKTYPE, link="good.png")
        add("fifo.png", tarfile.FIFOTYPE)
        add("dev.png", tarfile.CHRTYPE)
        add("disk.png", tarfile.BLKTYPE)
    (work / "hostile.tar").write_bytes(buf.getvalue())
    out = work / "out"
    before_parent = sorted(os.listdir(tmp_path.parent))
    before_tree = {p for p in tmp_path.rglob("*")}
    etc_x_existed = Path("/etc/x.png").exists()

    result, manifest = ingest_into(work / "hostile.tar", out)

    errors = {row["source"]: row["ingest_error"] for row in rows_by_source(manifest).values()}
    assert errors == {
        "hostile.tar:good": None,
        "hostile.tar:../../evil": "unsafe_member_name: ../../evil.png",
        "hostile.tar:/etc/x": "unsafe_member_name: /etc/x.png",
        "hostile.tar:link": "link_member: link.png -> /etc/passwd",
        "hostile.tar:hard": "link_member: hard.png -> good.png",
        "hostile.tar:fifo": "special_file: fifo.png",
        "hostile.tar:dev": "special_file: dev.png",
        "hostile.tar:disk": "special_file: disk.png",
    }
    assert result.n_with_errors == 7
    assert result.metrics["n_error_special_file"] == 3
    items = payloads(out, manifest)
    bad_keys = manifest.loc[manifest["ingest_error"].notna(), "key"]
    assert all(set(items[key][1]) == {"json"} for key in bad_keys)  # no image bytes for any of them
    assert items[manifest["key"].iloc[0]][1]["png"] == good
    # Nothing appeared outside out_dir.
    assert sorted(os.listdir(tmp_path.parent)) == before_parent
    new_paths = {p for p in tmp_path.rglob("*")} - before_tree
    assert new_paths and all(p == out or out in p.parents for p in new_paths)
    assert not list(tmp_path.parent.rglob("evil.png"))
    assert Path("/etc/x.png").exists() == etc_x_existed


def test_truncated_tar_keeps_items_read_so_far_and_reports_the_rest(tmp_path: Path):
    src = tmp_path / "wds"
    src.mkdir()
    members = [(f"{i:03d}.png", image_bytes(i) + b"\0" * 4000) for i in range(3)]
    whole = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmembers()[-1].offset_data + 1000  # inside the last member's data
    (src / "a.tar").write_bytes(whole[:cut])
    (src / "b.tar").write_bytes(b"this is not a tar file at all" * 40)

    result, manifest = ingest_into(src, tmp_path / "out")

    assert list(manifest["source"]) == ["a.tar:000", "a.tar:001", "a.tar", "b.tar"]
    assert manifest["ingest_error"].iloc[:2].isna().all()
    assert manifest["ingest_error"].iloc[2].startswith("unreadable_source: a.tar: ReadError")
    assert manifest["ingest_error"].iloc[3].startswith("unreadable_source: b.tar: ")
    assert result.metrics["n_error_unreadable_source"] == 2


def test_source_from_which_nothing_can_be_read_is_refused(tmp_path: Path):
    (tmp_path / "broken.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(BadInputError, match="nothing could be read.*unreadable_source"):
        ingest_into(tmp_path / "broken.tar", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_brace_pattern_reads_the_listed_shards_and_flags_missing_ones(webdataset_dir: Path, tmp_path: Path):
    (webdataset_dir / "00002.tar").write_bytes(tar_bytes(img2dataset_members(200, 5)))
    pattern = f"{webdataset_dir}/{{00000..00001}}.tar"
    assert detect_kind(pattern) == "webdataset"
    result, manifest = ingest_into(pattern, tmp_path / "out")
    assert result.n_items == 200 and manifest["source"].iloc[-1] == "00001.tar:000000199"

    result, manifest = ingest_into(f"{webdataset_dir}/{{00002,00009}}.tar", tmp_path / "out2")
    assert result.n_items == 6
    assert manifest["ingest_error"].iloc[-1] == "unreadable_source: 00009.tar: not found"


def test_memory_webdataset(memory_root, tmp_path: Path):
    fs, root = memory_root
    fs.pipe(f"{root}/wds/shard-00000.tar", tar_bytes(img2dataset_members(0, 4)))
    source = f"memory://{root}/wds"
    assert detect_kind(source) == "webdataset"

    result, manifest = ingest_into(source, tmp_path / "out")

    assert result.n_items == 4 and result.n_with_errors == 0
    items = payloads(tmp_path / "out", manifest)
    row, members = items["000000003"]
    assert row["source"] == "shard-00000.tar:000000003"
    assert members["jpg"] == image_bytes(3, "JPEG") and members["txt"] == b"caption 3"


def test_rerun_replaces_the_previous_dataset(webdataset_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    ingest_into(webdataset_dir, out, shard_size=10)
    n_before = len(list((out / "shards").iterdir()))
    result, manifest = ingest_into(webdataset_dir / "00000.tar", out, shard_size=100)
    shards_now = sorted(p.name for p in (out / "shards").iterdir())
    assert result.n_items == 100 and n_before > len(shards_now)
    assert shards_now == sorted(set(Path(s).name for s in manifest["shard"]))
    assert not (out / ".ingest-partial").exists()


def test_progress_and_summary(webdataset_dir: Path, tmp_path: Path):
    seen: list[int] = []
    result = ingest(str(webdataset_dir), tmp_path / "out", 50, 0.1, 0.1, progress=seen.append)
    assert seen == list(range(1, 201))
    text = summarize(result)
    assert "ingested 200 items" in text and "webdataset" in text and "splits: train" in text


# --- imagefolder ---------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list[dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_imagefolder_split_subfolders_and_bad_lines(tmp_path: Path):
    folder = tmp_path / "folder"
    secret = image_bytes(99)
    (tmp_path / "secret.png").write_bytes(secret)  # outside the folder: must never be read
    images = {
        "train/a.png": image_bytes(1),
        "train/sub/b.jpg": image_bytes(2, "JPEG"),
        "train/c.png": image_bytes(3),
        "validation/v.png": image_bytes(4),
        "test/t.png": image_bytes(5),
    }
    for rel, data in images.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    write_jsonl(folder / "train" / "metadata.jsonl", [
        {"file_name": "a.png", "text": "a red square", "score": 0.5},
        {"file_name": "sub/b.jpg", "text": "un café ☕"},
        {"file_name": "gone.png", "text": "a missing file"},
        "{not json",
        {"text": "no file name here"},
        {"file_name": "../../secret.png", "text": "escapes the folder"},
        {"file_name": "/etc/passwd", "text": "absolute"},
        "",
        {"file_name": "c.png"},
    ])
    write_jsonl(folder / "validation" / "metadata.jsonl", [{"file_name": "v.png", "caption": "from the val folder"}])
    write_jsonl(folder / "test" / "metadata.jsonl", [{"file_name": "t.png", "text": "from the test folder"}])
    assert detect_kind(str(folder)) == "imagefolder"

    result, manifest = ingest_into(folder, tmp_path / "out")

    rows = rows_by_source(manifest)
    assert list(rows) == [
        "train/a.png", "train/sub/b.jpg", "train/gone.png", "train/metadata.jsonl:4", "train/metadata.jsonl:5",
        "train/metadata.jsonl:6", "train/metadata.jsonl:7", "train/c.png", "validation/v.png", "test/t.png",
    ]
    assert rows["train/gone.png"]["ingest_error"] == "missing_image: train/gone.png"
    assert rows["train/metadata.jsonl:4"]["ingest_error"].startswith("bad_metadata_line: line 4: not JSON")
    assert rows["train/metadata.jsonl:5"]["ingest_error"] == "bad_metadata_line: line 5: no file_name"
    assert rows["train/metadata.jsonl:6"]["ingest_error"] == "unsafe_member_name: ../../secret.png"
    assert rows["train/metadata.jsonl:7"]["ingest_error"] == "unsafe_member_name: /etc/passwd"
    assert rows["train/c.png"]["ingest_error"] is None and rows["train/c.png"]["caption"] is None
    assert [rows[s]["split"] for s in ("train/a.png", "validation/v.png", "test/t.png")] == ["train", "val", "test"]
    assert result.n_with_errors == 5
    assert hashlib.sha256(secret).hexdigest() not in set(manifest["sha256"].dropna())

    items = payloads(tmp_path / "out", manifest)
    by_source = {row["source"]: members for row, members in items.values()}
    for rel, data in images.items():
        assert by_source[rel][rel.rsplit(".", 1)[1]] == data
    assert by_source["train/sub/b.jpg"]["txt"] == "un café ☕".encode()
    assert "txt" not in by_source["train/c.png"]  # missing caption: validate quarantines it
    assert json.loads(by_source["train/a.png"]["json"]) == {"source_meta": {"score": 0.5}}


def test_imagefolder_split_field_at_the_root(tmp_path: Path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in "xyzw":
        (folder / f"{name}.png").write_bytes(image_bytes(ord(name)))
    write_jsonl(folder / "metadata.jsonl", [
        {"file_name": "x.png", "text": "x", "split": "validation"},
        {"file_name": "y.png", "text": "y", "split": "dev"},
        {"file_name": "z.png", "text": "z", "split": "test"},
        {"file_name": "w.png", "text": "w"},
    ])
    _, manifest = ingest_into(folder, tmp_path / "out", val=0.0, test=0.0)
    rows = rows_by_source(manifest)
    assert [rows[s]["split"] for s in ("x.png", "y.png", "z.png", "w.png")] == ["val", "train", "test", "train"]
    assert rows["y.png"]["ingest_error"] == "bad_split: dev"


# --- manifests -----------------------------------------------------------------------------


def test_parquet_manifest_with_relative_and_absolute_paths(tmp_path: Path):
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "0.png").write_bytes(image_bytes(0))
    (data / "imgs" / "1.jpg").write_bytes(image_bytes(1, "JPEG"))
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(image_bytes(2))
    pd.DataFrame({
        "image_path": ["imgs/0.png", "imgs/1.jpg", str(elsewhere), "imgs/nope.png", None],
        "caption": ["zero", None, "two", "three", "four"],
        "split": ["test", None, "validation", "train", "train"],
        "score": [1, 2, 3, 4, 5],
    }).to_parquet(data / "manifest.parquet")
    assert detect_kind(str(data / "manifest.parquet")) == "manifest"

    result, manifest = ingest_into(data / "manifest.parquet", tmp_path / "out")

    rows = rows_by_source(manifest)
    assert list(rows) == ["imgs/0.png", "imgs/1.jpg", str(elsewhere), "imgs/nope.png", "row 5"]
    assert rows["imgs/nope.png"]["ingest_error"] == "missing_image: imgs/nope.png"
    assert rows["row 5"]["ingest_error"] == "bad_manifest_row: row 5: image_path is empty, expected a path or URL"
    assert [rows[s]["split"] for s in ("imgs/0.png", str(elsewhere))] == ["test", "val"]
    assert result.n_with_errors == 2
    by_source = {row["source"]: members for row, members in payloads(tmp_path / "out", manifest).values()}
    assert by_source["imgs/0.png"]["png"] == image_bytes(0) and by_source["imgs/0.png"]["txt"] == b"zero"
    assert by_source["imgs/1.jpg"]["jpg"] == image_bytes(1, "JPEG") and "txt" not in by_source["imgs/1.jpg"]
    assert by_source[str(elsewhere)]["png"] == image_bytes(2)
    assert json.loads(by_source["imgs/0.png"]["json"]) == {"source_meta": {"score": 1, "split": "test"}}


def test_csv_manifest_keeps_caption_bytes_exactly(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "b.png").write_bytes(image_bytes(1))
    (tmp_path / "c.png").write_bytes(image_bytes(2))
    (tmp_path / "list.csv").write_bytes(
        b"file_name,text,split\n"
        b"a.png,NA,\n"  # a literal caption "NA", not a missing value
        b"b.png,bad \xff utf-8,train\n"
        b"c.png,,holdout\n"
    )
    result, manifest = ingest_into(tmp_path / "list.csv", tmp_path / "out")
    by_source = {row["source"]: (row, m) for row, m in payloads(tmp_path / "out", manifest).values()}
    assert by_source["a.png"][1]["txt"] == b"NA"
    assert by_source["b.png"][1]["txt"] == b"bad \xff utf-8"  # validate judges the encoding, not ingest
    assert "txt" not in by_source["c.png"][1]
    assert by_source["c.png"][0]["ingest_error"] == "bad_split: holdout"
    assert by_source["c.png"][1]["png"] == image_bytes(2)
    assert result.n_items == 3


def test_manifest_without_an_image_column_is_refused(tmp_path: Path):
    pd.DataFrame({"picture": ["a.png"], "caption": ["x"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(BadInputError, match=r"found columns \[picture, caption\], accepted: image_path, file_name"):
        ingest_into(tmp_path / "m.csv", tmp_path / "out")


def test_memory_manifest(memory_root, tmp_path: Path):
    fs, root = memory_root
    fs.pipe(f"{root}/ds/images/0.png", image_bytes(0))
    fs.pipe(f"{root}/ds/images/1.png", image_bytes(1))
    fs.pipe(f"{root}/ds/list.csv", b"url,caption\nimages/0.png,zero\nimages/1.png,one\nimages/2.png,two\n")
    source = f"memory://{root}/ds/list.csv"
    assert detect_kind(source) == "manifest"

    result, manifest = ingest_into(source, tmp_path / "out")

    assert result.n_items == 3 and result.n_with_errors == 1
    assert rows_by_source(manifest)["images/2.png"]["ingest_error"] == "missing_image: images/2.png"
    by_source = {row["source"]: m for row, m in payloads(tmp_path / "out", manifest).values()}
    assert by_source["images/1.png"] == {"png": image_bytes(1), "txt": b"one", "json": b'{"source_meta": {}}'}


# --- sources that are not datasets ---------------------------------------------------------


@pytest.mark.parametrize("make", ["missing", "empty_dir", "text_file", "unknown_protocol"])
def test_unusable_sources_raise_one_helpful_line(tmp_path: Path, make: str):
    source = {
        "missing": str(tmp_path / "nowhere"),
        "empty_dir": str(tmp_path),
        "text_file": str(tmp_path / "notes.txt"),
        "unknown_protocol": "nosuchproto://bucket/data",
    }[make]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BadInputError) as caught:
        ingest_into(source, tmp_path / "out")
    message = str(caught.value)
    assert source in message and "\n" not in message
    if make != "unknown_protocol":
        assert "no .tar shards, metadata.jsonl, or .parquet/.csv manifest" in message


def test_imagefolder_symlink_escaping_the_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "folder"
    folder.mkdir()
    secret = image_bytes(77)
    (tmp_path / "secret.png").write_bytes(secret)
    (folder / "inside.png").write_bytes(image_bytes(1))
    (folder / "alias.png").symlink_to(folder / "inside.png")  # stays inside: fine
    (folder / "leak.png").symlink_to(tmp_path / "secret.png")  # resolves outside the folder
    write_jsonl(folder / "metadata.jsonl", [
        {"file_name": "inside.png", "text": "a"},
        {"file_name": "alias.png", "text": "b"},
        {"file_name": "leak.png", "text": "c"},
    ])
    _, manifest = ingest_into(folder, tmp_path / "out")
    rows = rows_by_source(manifest)
    assert rows["leak.png"]["ingest_error"] == "link_member: leak.png -> outside the folder"
    assert rows["alias.png"]["ingest_error"] is None
    assert hashlib.sha256(secret).hexdigest() not in set(manifest["sha256"].dropna())
