"""Bring user data (webdataset tars, an image folder, or a parquet/CSV manifest) into Cascade's layout.

`ingest()` reads a local path or any fsspec URL and writes tar shards plus a manifest with
`components.io.ShardWriter`. Nothing is decoded: raw bytes go into the shards and the `validate`
stage judges them. Problems found here become rows with an `ingest_error` ("code: detail") so
that validate quarantines them with that reason instead of silently dropping them:

    unsafe_member_name   a tar member name or image-folder file_name that is absolute or has `..`
    link_member          a symlink or hardlink tar member ("name -> target")
    special_file         a device, FIFO or other non-regular tar member
    unreadable_source    a tar that could not be opened or broke midway; one row stands for the rest
    bad_metadata_line    a metadata.jsonl line that is not a JSON object, lacks file_name, ...
    bad_manifest_row     a manifest row whose image reference or caption is empty or not text
    missing_image        the referenced image file (or a tar item's image member) does not exist
    unreadable_image     the image exists but could not be read (permissions, network, protocol)
    bad_split            a provided split that is not train / val / validation / test

Items with unsafe_member_name, link_member or special_file never store image bytes. A source
from which nothing at all could be read (every tar unreadable, or no items) raises BadInputError.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import posixpath
import re
import shutil
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import fsspec
from braceexpand import braceexpand
import pandas as pd
import pyarrow as pa

from components.errors import BadInputError, StageError
from components.io import MANIFEST_FILE, SHARDS_DIR, SPLITS, Sample, ShardWriter

KINDS = ("webdataset", "imagefolder", "manifest")
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # tarfile's "r|*" reads compressed shards too
MANIFEST_SUFFIXES = (".parquet", ".csv")
IMAGE_COLUMNS = ("image_path", "file_name", "path", "image", "url")  # first found wins
CAPTION_COLUMNS = ("caption", "text")
METADATA_FILE = "metadata.jsonl"
SPLIT_FOLDERS = (("train", "train"), ("validation", "val"), ("val", "val"), ("test", "test"))
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
LOOKED_FOR = "no .tar shards, metadata.jsonl, or .parquet/.csv manifest"
STAGING_DIR = ".ingest-partial"

# What a broken or truncated (possibly compressed) tar stream raises while it is read.
_TAR_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class IngestResult:
    source: str
    kind: str  # one of KINDS
    n_items: int
    n_with_errors: int  # rows with an ingest_error; validate quarantines them
    split_counts: dict[str, int]
    manifest: Path
    metrics: dict[str, int] = field(default_factory=dict)  # flat counts, ready for MLflow/DVC metrics


@dataclass(frozen=True)
class _Source:
    """A resolved source: its filesystem, its root (for display) and what to read."""

    kind: str
    fs: Any  # fsspec.AbstractFileSystem
    path: str  # the source path on fs (a pattern for brace sources)
    root: str  # item sources are shown relative to this
    tars: tuple[str, ...] = ()  # webdataset
    metadata_folders: tuple[tuple[str, str | None], ...] = ()  # imagefolder: (folder, its split)


@dataclass
class _Item:
    """One item as read from the source, before it gets our key and its split."""

    item_id: str  # the item's id in the source; its hash picks the split when none is given
    source: str
    image: bytes | None = None
    image_ext: str | None = None
    caption: bytes | None = None
    meta: dict = field(default_factory=dict)
    split: Any = None  # as provided by the user; None: assign by hash
    error: str | None = None


def detect_kind(source: str) -> str:
    """The layout of `source`: one of KINDS. BadInputError when it matches none."""
    return _resolve(source).kind


def ingest(
    source: str,
    out_dir: Path,
    shard_size: int,
    val_fraction: float,
    test_fraction: float,
    progress: Callable[[int], None] | None = None,
) -> IngestResult:
    """Normalize `source` into `out_dir` (shards/ + manifest.parquet) and return counts.

    Keys are f"{i:09d}" in source order (tars sorted by name, members in tar order; metadata
    lines in file order; manifest rows in order). A previous dataset in out_dir is replaced only
    once the new one is complete. `progress` gets the number of items processed so far.
    """
    if not (0 <= val_fraction <= 1 and 0 <= test_fraction <= 1 and val_fraction + test_fraction <= 1):
        raise StageError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must each be in [0, 1] "
            "and sum to at most 1"
        )
    src = _resolve(source)
    out_dir = Path(out_dir)
    staging = out_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left over from a killed run
    counters: Counter[str] = Counter()
    try:
        with ShardWriter(staging, shard_size) as writer:
            for i, item in enumerate(_READERS[src.kind](src, counters)):
                writer.write(_to_sample(item, f"{i:09d}", val_fraction, test_fraction))
                counters["image_bytes"] += len(item.image or b"")
                if progress is not None:
                    progress(i + 1)
        rows = writer.rows
        if not rows:
            raise BadInputError(f"{source}: no items found ({src.kind} layout)")
        if all((row["ingest_error"] or "").startswith("unreadable_source:") for row in rows):
            raise BadInputError(f"{source}: nothing could be read; first error: {rows[0]['ingest_error']}")
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _result(source, src.kind, rows, counters, out_dir / MANIFEST_FILE)


def summarize(result: IngestResult) -> str:
    """A few lines for the CLI."""
    splits = ", ".join(f"{split} {result.split_counts.get(split, 0)}" for split in SPLITS)
    lines = [
        f"ingested {result.n_items} items from {result.source} ({result.kind}) -> {result.manifest}",
        f"splits: {splits}",
    ]
    if result.n_with_errors:
        codes = sorted((k.removeprefix("n_error_"), int(v)) for k, v in result.metrics.items() if k.startswith("n_error_"))
        detail = ", ".join(f"{code} {count}" for code, count in codes)
        lines.append(f"{result.n_with_errors} items with ingest errors, validate will quarantine them: {detail}")
    if result.metrics.get("n_ignored_members"):
        lines.append(f"ignored {int(result.metrics['n_ignored_members'])} tar members that are not an image, .txt or .json")
    if result.metrics.get("n_bad_meta_json"):
        lines.append(f"{int(result.metrics['n_bad_meta_json'])} .json sidecars were not valid JSON (kept as source_meta_error)")
    return "\n".join(lines)


# --- source resolution ---------------------------------------------------------------------


def _resolve(source: str) -> _Source:
    try:
        fs, path = fsspec.core.url_to_fs(source)
    except (ImportError, ValueError) as err:  # unknown protocol, or its package is not installed
        raise BadInputError(f"{source}: cannot open this location: {err}") from None
    try:
        return _resolve_on(fs, path, source)
    except OSError as err:  # permissions, network: the message names the problem
        raise BadInputError(f"{source}: cannot read: {_describe(err)}") from None


def _resolve_on(fs: Any, path: str, source: str) -> _Source:
    expanded = list(braceexpand(path))  # img2dataset shard patterns: {00000..00009}, {a,b}
    if expanded != [path]:
        if not all(p.endswith(TAR_SUFFIXES) for p in expanded):
            raise BadInputError(f"{source}: a brace pattern must expand to .tar shards, got e.g. {expanded[0]}")
        if not any(fs.isfile(p) for p in expanded):
            raise BadInputError(f"{source}: none of the {len(expanded)} shards this pattern expands to exist")
        root = posixpath.dirname(path[: path.index("{")])
        return _Source("webdataset", fs, path, root, tars=tuple(expanded))  # a missing one: unreadable_source
    if fs.isfile(path):
        root = posixpath.dirname(path)
        if path.endswith(TAR_SUFFIXES):
            return _Source("webdataset", fs, path, root, tars=(path,))
        if path.endswith(MANIFEST_SUFFIXES):
            return _Source("manifest", fs, path, root)
        raise BadInputError(f"{source}: {LOOKED_FOR} (a file must end in .tar, .parquet or .csv)")
    if fs.isdir(path):
        folders = [("", None)] + [(name, split) for name, split in SPLIT_FOLDERS]
        with_metadata = tuple(
            (folder, split) for folder, split in folders if fs.isfile(posixpath.join(path, folder, METADATA_FILE))
        )
        if with_metadata:
            return _Source("imagefolder", fs, path, path, metadata_folders=with_metadata)
        tars = sorted(
            entry["name"]
            for entry in fs.ls(path, detail=True)
            if entry["type"] == "file"
            and entry["name"].endswith(TAR_SUFFIXES)
            and not posixpath.basename(entry["name"]).startswith(".")  # macOS "._x.tar" resource forks
        )
        if tars:
            return _Source("webdataset", fs, path, path, tars=tuple(tars))
    raise BadInputError(f"{LOOKED_FOR} at {source}")


# --- webdataset ----------------------------------------------------------------------------


@dataclass
class _TarGroup:
    """Members of one tar sharing a webdataset key."""

    key: str
    image: bytes | None = None
    image_ext: str | None = None
    caption: bytes | None = None
    meta_json: bytes | None = None
    error: str | None = None

    def is_item(self) -> bool:  # a group of only ignored members (README, .npy, ...) is no item
        return any(v is not None for v in (self.image, self.caption, self.meta_json, self.error))


def _webdataset_items(src: _Source, counters: Counter[str]) -> Iterator[_Item]:
    for tar_path in src.tars:
        shown = _relative(tar_path, src.root)
        groups = _tar_groups(src.fs, tar_path, counters)
        while True:
            # Only the tar reading is guarded: a broken tar ends that tar with one row, a bug still raises.
            try:
                group = next(groups)
            except StopIteration:
                break
            except _TAR_READ_ERRORS as err:
                yield _Item(item_id=shown, source=shown, error=f"unreadable_source: {shown}: {_describe(err)}")
                break
            yield _tar_item(group, shown, counters)


def _tar_groups(fs: Any, path: str, counters: Counter[str]) -> Iterator[_TarGroup]:
    """Consecutive members with the same key form an item, as in webdataset's group_by_keys.

    Streamed ("r|*"): memory holds one item, nothing is extracted, member names are only parsed.
    An item cut off by a read error is not yielded; the caller's unreadable_source row covers it.
    """
    group: _TarGroup | None = None
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.isdir():
                continue
            key, suffix = _webdataset_key(info.name)
            if group is None or key != group.key:
                if group is not None and group.is_item():
                    yield group
                group = _TarGroup(key)
            _add_member(group, info, suffix, tar, counters)
    if group is not None and group.is_item():
        yield group


def _webdataset_key(name: str) -> tuple[str, str]:
    """("dir/KEY", "suffix"): the path up to the first dot of the basename, and the rest lowercased."""
    folder, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, suffix.lower()


def _add_member(group: _TarGroup, info: tarfile.TarInfo, suffix: str, tar: tarfile.TarFile, counters: Counter[str]) -> None:
    problem = _member_problem(info)
    if problem is not None:
        group.error = group.error or problem
        return
    slot = "image" if suffix in IMAGE_EXTS else {"txt": "caption", "json": "meta_json"}.get(suffix)
    if slot is None or getattr(group, slot) is not None:  # other suffixes, or a second image/caption
        counters["ignored_members"] += 1
        return
    data = tar.extractfile(info).read()
    setattr(group, slot, data)
    if slot == "image":
        group.image_ext = suffix


def _member_problem(info: tarfile.TarInfo) -> str | None:
    if _unsafe_name(info.name):
        return f"unsafe_member_name: {info.name}"
    if info.issym() or info.islnk():
        return f"link_member: {info.name} -> {info.linkname}"
    if not info.isfile():  # character/block devices, FIFOs, anything else that is not plain data
        return f"special_file: {info.name}"
    return None


def _tar_item(group: _TarGroup, shown: str, counters: Counter[str]) -> _Item:
    source = f"{shown}:{group.key}"
    meta: dict = {}
    if group.meta_json is not None:
        try:
            meta["source_meta"] = json.loads(group.meta_json)
        except ValueError as err:  # a broken sidecar is metadata trouble, not a reason to drop the image
            meta["source_meta_error"] = f"not JSON: {err}"
            counters["bad_meta_json"] += 1
    error = group.error
    if error is None and group.image is None:
        error = f"missing_image: {source} has no image member"
    return _Item(
        item_id=group.key,
        source=source,
        image=None if group.error else group.image,  # nothing from a group with a suspicious member
        image_ext=group.image_ext,
        caption=group.caption,
        meta=meta,
        error=error,
    )


# --- imagefolder ---------------------------------------------------------------------------


def _imagefolder_items(src: _Source, counters: Counter[str]) -> Iterator[_Item]:
    for folder, folder_split in src.metadata_folders:
        base = posixpath.join(src.root, folder) if folder else src.root
        shown_file = posixpath.join(folder, METADATA_FILE)
        with src.fs.open(posixpath.join(base, METADATA_FILE), "rb") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _imagefolder_item(src.fs, base, folder, f"{shown_file}:{line_no}", line_no, line, folder_split)


def _imagefolder_item(
    fs: Any, base: str, folder: str, where: str, line_no: int, line: bytes, folder_split: str | None
) -> _Item:
    def bad(why: str) -> _Item:
        return _Item(item_id=where, source=where, error=f"bad_metadata_line: line {line_no}: {why}")

    try:
        record = json.loads(line)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        return bad(f"not JSON ({err})")
    if not isinstance(record, dict):
        return bad(f"expected a JSON object, got {type(record).__name__}")
    name = record.get("file_name")
    if not isinstance(name, str) or not name:
        return bad("no file_name")
    caption_key = "text" if "text" in record else "caption"
    caption = record.get(caption_key)
    if caption is not None and not isinstance(caption, str):
        return bad(f"{caption_key} is {type(caption).__name__}, expected a string")
    shown = posixpath.join(folder, name) if folder else name
    item = _Item(
        item_id=shown,
        source=shown,
        caption=None if caption is None else caption.encode("utf-8", "surrogateescape"),
        meta={"source_meta": {k: v for k, v in record.items() if k not in ("file_name", caption_key)}},
        split=record.get("split", folder_split),
    )
    if _unsafe_name(name):  # it would read outside the folder: never opened, shown by its line
        item.source, item.error = where, f"unsafe_member_name: {name}"
    elif _links_outside(fs, base, name):  # same escape through a symlink: refused like a tar link member
        item.error = f"link_member: {name} -> outside the folder"
    else:
        _read_image(item, fs, posixpath.join(base, name), shown)
    return item


def _links_outside(fs: Any, base: str, name: str) -> bool:
    """A local file_name that resolves (through symlinks) outside the image folder."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not {"file", "local"} & set(protocols):
        return False
    return not Path(base, name).resolve().is_relative_to(Path(base).resolve())


# --- parquet / CSV manifest ----------------------------------------------------------------


def _manifest_items(src: _Source, counters: Counter[str]) -> Iterator[_Item]:
    frame = _read_table(src.fs, src.path)
    image_col = next((c for c in IMAGE_COLUMNS if c in frame.columns), None)
    if image_col is None:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise BadInputError(
            f"{src.path}: no image column; found columns [{found}], accepted: {', '.join(IMAGE_COLUMNS)}"
        )
    caption_col = next((c for c in CAPTION_COLUMNS if c in frame.columns), None)
    others = [c for c in frame.columns if c not in (image_col, caption_col)]
    base = posixpath.dirname(src.path)
    for row_no, record in enumerate(frame.to_dict("records"), 1):
        record = {k: (None if _missing(v) else v) for k, v in record.items()}
        ref = record[image_col]
        caption = record[caption_col] if caption_col else None
        where = f"row {row_no}"
        item = _Item(
            item_id=ref if isinstance(ref, str) and ref else where,
            source=ref if isinstance(ref, str) and ref else where,
            meta={"source_meta": json.loads(json.dumps({k: record[k] for k in others}, default=_jsonable))},
            split=record.get("split"),
        )
        if isinstance(caption, str):
            item.caption = caption.encode("utf-8", "surrogateescape")  # CSV bytes come back exactly
        elif isinstance(caption, bytes):
            item.caption = caption
        elif caption is not None:
            item.error = f"bad_manifest_row: {where}: {caption_col} is {type(caption).__name__}, expected text"
        if not isinstance(ref, str) or not ref:
            got = "empty" if ref is None or ref == "" else f"a {type(ref).__name__}"
            item.error = item.error or f"bad_manifest_row: {where}: {image_col} is {got}, expected a path or URL"
        elif item.error is None:
            try:
                fs, path = _locate(src.fs, base, ref)
            except (ImportError, ValueError) as err:  # unknown protocol, or its package is not installed
                item.error = f"unreadable_image: {ref}: {_describe(err)}"
            else:
                _read_image(item, fs, path, ref)
        yield item


def _read_table(fs: Any, path: str) -> pd.DataFrame:
    try:
        with fs.open(path, "rb") as f:
            if path.endswith(".csv"):
                # Everything as text ("NA" stays "NA"); object dtype keeps undecodable bytes as surrogates.
                return pd.read_csv(
                    f, dtype=object, keep_default_na=False, na_values=[""], encoding_errors="surrogateescape"
                )
            return pd.read_parquet(f)
    except (ValueError, OSError, pa.ArrowException) as err:
        raise BadInputError(f"{path}: cannot read this manifest: {_describe(err)}") from None


def _locate(fs: Any, base: str, ref: str) -> tuple[Any, str]:
    """URLs and absolute paths as-is; relative paths against the manifest's directory, same fs."""
    if "://" in ref:
        return fsspec.core.url_to_fs(ref)
    if ref.startswith("/"):
        return fs, ref
    return fs, posixpath.normpath(posixpath.join(base, ref))


# --- shared helpers ------------------------------------------------------------------------


def _read_image(item: _Item, fs: Any, path: str, shown: str) -> None:
    """Fill item.image (raw bytes) or item.error."""
    try:
        item.image = fs.cat_file(path)
    except FileNotFoundError:
        item.error = f"missing_image: {shown}"
        return
    except (OSError, ImportError, ValueError) as err:  # permissions, a directory, network, unknown protocol
        item.error = f"unreadable_image: {shown}: {_describe(err)}"
        return
    ext = re.search(r"\.([A-Za-z0-9]{1,5})$", urlsplit(path).path if "://" in path else path)
    item.image_ext = ext.group(1).lower() if ext else None


def _unsafe_name(name: str) -> bool:
    """Absolute (POSIX, Windows drive or UNC), any `..` component, or control characters."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    if any(part == ".." for part in re.split(r"[/\\]", name)):
        return True
    return any(ord(c) < 32 or ord(c) == 127 for c in name)


def _to_sample(item: _Item, key: str, val_fraction: float, test_fraction: float) -> Sample:
    error = item.error
    if item.split is None or item.split == "":
        split = _hash_split(item.item_id, val_fraction, test_fraction)
    else:
        split = SPLIT_ALIASES.get(item.split.strip().lower()) if isinstance(item.split, str) else None
        if split is None:
            error = error or f"bad_split: {item.split}"
            split = "train"
    return Sample(
        key=key,
        split=split,
        image=item.image,
        image_ext=item.image_ext if item.image is not None else None,
        caption=item.caption,
        meta=item.meta,
        source=_show(item.source),
        ingest_error=None if error is None else _show(error),
    )


def _hash_split(item_id: str, val_fraction: float, test_fraction: float) -> str:
    """test if h < test_fraction, val if h < test + val, else train; h uniform in [0, 1) from the id."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogateescape")).digest()
    h = int.from_bytes(digest[:8], "big") / 2**64
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def _publish(staging: Path, out_dir: Path) -> None:
    """Swap the finished dataset in; a previous run's shards would otherwise linger beside it."""
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    (staging / SHARDS_DIR).replace(out_dir / SHARDS_DIR)
    (staging / MANIFEST_FILE).replace(out_dir / MANIFEST_FILE)


def _result(source: str, kind: str, rows: list[dict], counters: Counter[str], manifest: Path) -> IngestResult:
    per_split = Counter(row["split"] for row in rows)
    split_counts = {split: per_split[split] for split in SPLITS}
    error_codes = Counter(row["ingest_error"].split(":", 1)[0] for row in rows if row["ingest_error"])
    n_with_errors = sum(error_codes.values())
    metrics = {
        "n_items": len(rows),
        "n_with_errors": n_with_errors,
        "n_ignored_members": counters["ignored_members"],
        "n_bad_meta_json": counters["bad_meta_json"],
        "image_bytes": counters["image_bytes"],
        **{f"n_split_{split}": count for split, count in split_counts.items()},
        **{f"n_error_{code}": count for code, count in sorted(error_codes.items())},
    }
    return IngestResult(source, kind, len(rows), n_with_errors, split_counts, manifest, metrics)


def _relative(path: str, root: str) -> str:
    return path[len(root) + 1 :] if root and path.startswith(root.rstrip("/") + "/") else path


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def _jsonable(value: Any) -> Any:
    """json.dumps fallback for manifest cells: numpy scalars/arrays, timestamps, bytes."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _describe(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "not found"
    return _show(f"{type(err).__name__}: {err}")


def _show(text: str) -> str:
    """One printable, valid-UTF-8 line: undecodable bytes and control characters escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


_READERS: dict[str, Callable[[_Source, Counter[str]], Iterator[_Item]]] = {
    "webdataset": _webdataset_items,
    "imagefolder": _imagefolder_items,
    "manifest": _manifest_items,
}
