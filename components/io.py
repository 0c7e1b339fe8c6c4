"""Dataset layout shared by every stage: webdataset-style tar shards plus a parquet manifest.

A dataset directory holds:

    manifest.parquet          one row per item, columns MANIFEST_COLUMNS
    shards/{split}-{n:06d}.tar  img2dataset layout: KEY.png|KEY.jpg, KEY.txt, KEY.json

Shards store the raw bytes exactly as they came (the caption may even be invalid UTF-8), so the
`validate` stage judges what the user really supplied. Problems found while ingesting (an unsafe
tar member name, a link member, a missing image file) are recorded in `ingest_error` rather than
dropped, so `validate` can quarantine the item with that reason: items in = accepted + quarantined.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MANIFEST_FILE = "manifest.parquet"
ACCEPTED_FILE = "accepted.parquet"  # written by the validate stage: the manifest rows that passed
SHARDS_DIR = "shards"
SPLITS = ("train", "val", "test")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # unique within the dataset; member stem in the shard
        ("shard", pa.string()),  # shard path relative to the dataset directory
        ("image_member", pa.string()),  # member name of the image in the shard; null if none
        ("caption", pa.string()),  # decoded for display (errors replaced); null if missing
        ("width", pa.int64()),  # from the image header, without decoding; null if unreadable
        ("height", pa.int64()),
        ("sha256", pa.string()),  # of the image bytes; null if no image
        ("split", pa.string()),  # train | val | test
        ("scene", pa.string()),  # JSON of the structured scene (built-in data), else null
        ("source", pa.string()),  # where the item came from (path, tar:member, URL)
        ("ingest_error", pa.string()),  # "reason: detail" found during ingestion, else null
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


@dataclass
class Sample:
    """One item on its way into a shard. Bytes are raw; nothing here is decoded."""

    key: str
    split: str
    image: bytes | None
    image_ext: str | None  # "png", "jpg", ...; None when there is no image
    caption: bytes | None  # raw caption bytes (KEY.txt)
    meta: dict = field(default_factory=dict)  # written as KEY.json
    scene: dict | None = None
    source: str = ""
    ingest_error: str | None = None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def header_size(image: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header only; (None, None) when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(image)) as im:  # lazy: reads the header, decodes nothing
            return im.size
    except Image.DecompressionBombError:
        return None, None
    except Exception:
        return None, None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic shards: same input, same bytes, same DVC hash
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes Samples into per-split tar shards of at most `shard_size` items and collects rows."""

    def __init__(self, root: str | Path, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.shard_size = shard_size
        (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._open: dict[str, tuple[tarfile.TarFile, str, int]] = {}  # split -> (tar, rel, count)
        self._next_index: dict[str, int] = {}
        self._keys: set[str] = set()

    def _tar_for(self, split: str) -> tuple[tarfile.TarFile, str]:
        tar, rel, count = self._open.get(split, (None, "", 0))
        if tar is None or count >= self.shard_size:
            if tar is not None:
                tar.close()
            index = self._next_index.get(split, 0)
            self._next_index[split] = index + 1
            rel = f"{SHARDS_DIR}/{split}-{index:06d}.tar"
            tar = tarfile.open(self.root / rel, "w", format=tarfile.PAX_FORMAT)
            count = 0
        self._open[split] = (tar, rel, count + 1)
        return tar, rel

    def write(self, sample: Sample) -> dict:
        if sample.split not in SPLITS:
            raise ValueError(f"item {sample.key!r}: split must be one of {SPLITS}, got {sample.split!r}")
        if sample.key in self._keys or "/" in sample.key or sample.key.startswith("."):
            raise ValueError(f"item key {sample.key!r} is duplicated or not a plain file stem")
        self._keys.add(sample.key)
        tar, rel = self._tar_for(sample.split)
        image_member = None
        width = height = None
        digest = None
        if sample.image is not None:
            image_member = f"{sample.key}.{sample.image_ext or 'bin'}"
            _add_member(tar, image_member, sample.image)
            width, height = header_size(sample.image)
            digest = sha256_bytes(sample.image)
        if sample.caption is not None:
            _add_member(tar, f"{sample.key}.txt", sample.caption)
        meta = dict(sample.meta)
        if sample.scene is not None:
            meta["scene"] = sample.scene
        _add_member(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())
        row = {
            "key": sample.key,
            "shard": rel,
            "image_member": image_member,
            "caption": None if sample.caption is None else sample.caption.decode("utf-8", errors="replace"),
            "width": width,
            "height": height,
            "sha256": digest,
            "split": sample.split,
            "scene": None if sample.scene is None else json.dumps(sample.scene, sort_keys=True),
            "source": sample.source,
            "ingest_error": sample.ingest_error,
        }
        self.rows.append(row)
        return row

    def close(self) -> pd.DataFrame:
        for tar, _, _ in self._open.values():
            tar.close()
        self._open.clear()
        manifest = manifest_frame(self.rows)
        write_manifest(manifest, self.root / MANIFEST_FILE)
        return manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for tar, _, _ in self._open.values():
                tar.close()


def manifest_frame(rows: list[dict]) -> pd.DataFrame:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    return table.to_pandas()


def write_manifest(df: pd.DataFrame, path: str | Path, schema: pa.Schema | None = None) -> None:
    """Write a manifest-like frame as parquet; the row order is kept (it is part of the digest)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    pq.write_table(table, path)


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest here (expected a dataset written by `cascade ingest` or the data stage)")
    df = pq.read_table(path).to_pandas()
    missing = [c for c in ("key", "shard", "split") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a Cascade manifest, missing columns {missing}")
    return df


def read_accepted(validate_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The validate stage's accepted manifest (only `columns` if given); BadInputError if it is
    missing, unreadable or lacks a column, with what to run."""
    from components.errors import BadInputError

    path = Path(validate_dir) / ACCEPTED_FILE
    if not path.is_file():
        raise BadInputError(f"{path}: no accepted manifest; run the validate stage first (cascade stage validate)")
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as err:
        raise BadInputError(f"{path}: not a readable parquet file ({err}); rerun the validate stage") from None
    missing = [c for c in (columns or ()) if c not in names]
    if missing:
        raise BadInputError(f"{path}: missing columns {missing}; expected the accepted manifest written by validate")
    return pq.read_table(path, columns=columns).to_pandas()


def iter_shard(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for the regular files of one of *our* shards, in order."""
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if info.isfile():
                f = tar.extractfile(info)
                yield info.name, (f.read() if f is not None else b"")


def read_items(root: str | Path, manifest: pd.DataFrame) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """For each manifest row (grouped by shard, manifest order within a shard): (row, {suffix: bytes}).

    Suffixes are the member name after the key, e.g. "png", "txt", "json". Each shard is read once.
    """
    root = Path(root)
    for shard, rows in manifest.groupby("shard", sort=True):
        members: dict[str, dict[str, bytes]] = {}
        for name, data in iter_shard(root / shard):
            stem, _, suffix = name.partition(".")
            members.setdefault(stem, {})[suffix] = data
        for row in rows.to_dict("records"):
            yield row, members.get(row["key"], {})


def frame_digest(df: pd.DataFrame) -> str:
    """Content digest of a frame (column names, dtypes and values), stable across runs."""
    h = hashlib.sha256()
    h.update(json.dumps([list(map(str, df.columns)), [str(t) for t in df.dtypes]]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).values.tobytes())
    return h.hexdigest()


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
