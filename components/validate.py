"""The `validate` stage: judge every item of a dataset, split it into accepted and quarantined.

Reads `data_dir/manifest.parquet` and the shards it names (each shard once, each image decoded at
most once) and writes, only under `out_dir`:

    accepted.parquet    manifest rows that passed (same columns; `shard` still relative to data_dir)
    quarantine.parquet  manifest rows that failed, plus `reason` (a stable code) and `detail`
    summary.json        counts, reason counts, bad fraction vs threshold, pass/fail, GX results
    data_docs/          Great Expectations Data Docs for the accepted manifest (open index.html)

Every item gets exactly one verdict, so items = accepted + quarantined (checked before writing).
A quarantined item carries ONE reason: the first failing check in this order (CHECK_ORDER):

 1. ingest_error set by ingestion -> its code, the part before ": " (e.g. unsafe_member_name,
    link_member, special_file, missing_image, unreadable_source); `ingest_error` if it has no code
 2. image (one full decode, at truncated_image; the checks before it read only the header):
    missing_image       no image member in the shard (or no shard recorded)
    empty_file          the image member has zero bytes
    not_an_image        PIL cannot identify the bytes (e.g. text named .png)
    decompression_bomb  width*height from the header > max_pixels; refused before decoding
    truncated_image     the header or the full decode (im.load()) fails or stops short
    bad_color_mode      mode not in allowed_modes
    too_small           shorter side < min_side
    too_large           longer side > max_side
    bad_aspect_ratio    long side / short side > max_aspect_ratio
 3. caption (KEY.txt):
    missing_caption     no txt member, or empty / whitespace-only
    caption_not_utf8    the raw bytes are not strict UTF-8
    caption_too_short   stripped length < caption_min_chars characters
    caption_too_long    stripped length > caption_max_chars characters
 4. duplicate_image     same sha256 of image bytes as an earlier accepted item, in manifest order
                        (the first occurrence is kept; detail names it)

The stage fails (StageError, one line, after writing every output) when the quarantined share
exceeds max_bad_fraction or the Great Expectations suite fails on the accepted manifest. A missing
or empty manifest, null/duplicated keys, or unreadable shards fail it before anything is written.

`run` is the pure stage; `execute` wraps it in the stage's MLflow run; `summarize` and
`summarize_dir` format a result (or a failed run's summary.json) for the CLI.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile, UnidentifiedImageError

from components.config import CascadeConfig, ValidateConfig
from components.errors import StageError
from components.expectations import run_suite
from components.io import ACCEPTED_FILE, MANIFEST_FILE, read_items, read_manifest, sha256_bytes, write_json, write_manifest
from components.stage import TrackedInput, tracked

INGEST_ERROR = "ingest_error"  # an ingest_error value without a "code: " prefix
MISSING_IMAGE = "missing_image"
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TRUNCATED_IMAGE = "truncated_image"
BAD_COLOR_MODE = "bad_color_mode"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
MISSING_CAPTION = "missing_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
CAPTION_TOO_SHORT = "caption_too_short"
CAPTION_TOO_LONG = "caption_too_long"
DUPLICATE_IMAGE = "duplicate_image"

# The order in which checks run; the first failure is the item's reason. Ingestion's own codes
# (or INGEST_ERROR) come before all of these.
CHECK_ORDER = (
    MISSING_IMAGE,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    DECOMPRESSION_BOMB,
    TRUNCATED_IMAGE,
    BAD_COLOR_MODE,
    TOO_SMALL,
    TOO_LARGE,
    BAD_ASPECT_RATIO,
    MISSING_CAPTION,
    CAPTION_NOT_UTF8,
    CAPTION_TOO_SHORT,
    CAPTION_TOO_LONG,
    DUPLICATE_IMAGE,
)

QUARANTINE_FILE = "quarantine.parquet"
SUMMARY_FILE = "summary.json"
DATA_DOCS_DIR = "data_docs"

_INGEST_CODE = re.compile(r"[a-z][a-z0-9_]*")
_SHOWN = 60  # characters of an offending value quoted in a detail

Problem = tuple[str, str]  # (reason code, human-readable detail)


@dataclass(frozen=True)
class ValidateResult:
    n_items: int
    n_accepted: int
    n_quarantined: int
    bad_fraction: float
    max_bad_fraction: float
    passed: bool  # bad_fraction within the threshold and the GX suite succeeded
    reason_counts: dict[str, int]  # most frequent first
    gx_success: bool
    accepted_path: Path
    quarantine_path: Path
    summary_path: Path
    data_docs_dir: Path

    @property
    def data_docs_index(self) -> Path:
        return self.data_docs_dir / "index.html"

    @classmethod
    def from_summary(cls, path: Path) -> "ValidateResult":
        """The result of an earlier run, read back from its summary.json (e.g. one that raised)."""
        summary = json.loads(Path(path).read_text())
        outputs = summary["outputs"]
        return cls(
            **{name: summary[name] for name in ("n_items", "n_accepted", "n_quarantined", "bad_fraction",
                                                "max_bad_fraction", "passed", "gx_success")},
            reason_counts=_by_count(summary["reason_counts"]),
            accepted_path=Path(outputs["accepted"]),
            quarantine_path=Path(outputs["quarantine"]),
            summary_path=Path(path),
            data_docs_dir=Path(outputs["data_docs"]).parent,
        )

    @property
    def metrics(self) -> dict[str, float]:
        metrics = {
            "n_items": float(self.n_items),
            "n_accepted": float(self.n_accepted),
            "n_quarantined": float(self.n_quarantined),
            "bad_fraction": self.bad_fraction,
            "gx_success": float(self.gx_success),
        }
        metrics.update({f"quarantined_{reason}": float(n) for reason, n in self.reason_counts.items()})
        return metrics


def run(cfg: ValidateConfig, data_dir: Path, out_dir: Path,
        progress: Callable[[int], None] | None = None) -> ValidateResult:
    """Check every item; `progress` is called with the number of items checked so far."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    manifest_path = data_dir / MANIFEST_FILE
    manifest = _load_manifest(manifest_path)
    problems = _check_all(cfg, data_dir, manifest, progress)

    quarantined = sorted(problems)
    accepted_rows = [pos for pos in range(len(manifest)) if pos not in problems]
    accepted = manifest.iloc[accepted_rows].reset_index(drop=True)
    quarantine = manifest.iloc[quarantined].reset_index(drop=True)
    quarantine["reason"] = [problems[pos][0] for pos in quarantined]
    quarantine["detail"] = [problems[pos][1] for pos in quarantined]
    _check_partition(manifest, accepted, quarantine)

    out_dir.mkdir(parents=True, exist_ok=True)
    schema = pq.read_schema(manifest_path).remove_metadata()  # write back exactly the manifest's types
    accepted_path, quarantine_path = out_dir / ACCEPTED_FILE, out_dir / QUARANTINE_FILE
    write_manifest(accepted, accepted_path, schema=schema)
    write_manifest(
        quarantine,
        quarantine_path,
        schema=schema.append(pa.field("reason", pa.string())).append(pa.field("detail", pa.string())),
    )
    docs_dir = out_dir / DATA_DOCS_DIR
    shutil.rmtree(docs_dir, ignore_errors=True)  # GX adds pages per run; keep only this run's
    gx_success, gx_results = run_suite(accepted, cfg, docs_dir)

    reason_counts = _by_count({str(r): int(n) for r, n in quarantine["reason"].value_counts().items()})
    bad_fraction = len(quarantine) / len(manifest)
    within_threshold = bad_fraction <= cfg.max_bad_fraction
    result = ValidateResult(
        n_items=len(manifest),
        n_accepted=len(accepted),
        n_quarantined=len(quarantine),
        bad_fraction=bad_fraction,
        max_bad_fraction=cfg.max_bad_fraction,
        passed=within_threshold and gx_success,
        reason_counts=reason_counts,
        gx_success=gx_success,
        accepted_path=accepted_path,
        quarantine_path=quarantine_path,
        summary_path=out_dir / SUMMARY_FILE,
        data_docs_dir=docs_dir,
    )
    write_json(
        result.summary_path,
        {
            "data_dir": str(data_dir),
            "n_items": result.n_items,
            "n_accepted": result.n_accepted,
            "n_quarantined": result.n_quarantined,
            "bad_fraction": bad_fraction,
            "max_bad_fraction": cfg.max_bad_fraction,
            "passed": result.passed,
            "reason_counts": reason_counts,
            "check_order": list(CHECK_ORDER),
            "gx_success": gx_success,
            "gx_expectations": gx_results,
            "outputs": {
                "accepted": str(accepted_path),
                "quarantine": str(quarantine_path),
                "data_docs": str(result.data_docs_index),
            },
        },
    )

    if not within_threshold:
        top = ", ".join(f"{reason} {n}" for reason, n in list(reason_counts.items())[:3])
        raise StageError(
            f"validate: {bad_fraction:.1%} of {len(manifest)} items quarantined "
            f"(max_bad_fraction {cfg.max_bad_fraction:.1%}); top reasons: {top}; see {quarantine_path}"
        )
    if not gx_success:
        failed = ", ".join(
            f"{name} ({r['unexpected_count']} unexpected)" for name, r in gx_results.items() if not r["success"]
        )
        raise StageError(
            f"validate: the Great Expectations suite failed on the accepted manifest: {failed}; "
            f"see {result.data_docs_index}"
        )
    return result


def execute(cfg: CascadeConfig, data_dir: Path, out_dir: Path, metrics_file: Path,
            parent_run_id: str | None = None, progress: Callable[[int], None] | None = None) -> ValidateResult:
    """`run` inside the stage's MLflow run (what `cascade stage validate` and the KFP task call)."""
    return tracked(
        "validate", cfg, lambda: run(cfg.validate, data_dir, out_dir, progress), metrics_file,
        inputs=lambda: [TrackedInput(Path(data_dir) / MANIFEST_FILE, "manifest", "validate")],
        artifacts=lambda result: [result.summary_path, result.quarantine_path, result.data_docs_dir],
        parent_run_id=parent_run_id,
    )


def summarize(result: ValidateResult) -> str:
    """A few lines for the CLI."""
    verdict = "PASSED" if result.passed else "FAILED"
    reasons = ", ".join(f"{reason} {n}" for reason, n in result.reason_counts.items()) or "none"
    return "\n".join(
        [
            f"validate {verdict}: {result.n_items} items, {result.n_accepted} accepted, "
            f"{result.n_quarantined} quarantined ({result.bad_fraction:.1%}, max {result.max_bad_fraction:.1%})",
            f"  quarantine reasons: {reasons}",
            f"  Great Expectations suite: {'passed' if result.gx_success else 'failed'}",
            f"  accepted:   {result.accepted_path}",
            f"  quarantine: {result.quarantine_path}",
            f"  data docs:  {result.data_docs_index}",
        ]
    )


def summarize_dir(out_dir: Path) -> str:
    """`summarize` for the run whose outputs are in `out_dir` (the CLI prints it when `run` raised)."""
    path = Path(out_dir) / SUMMARY_FILE
    if not path.is_file():
        return f"validate: no {SUMMARY_FILE} in {out_dir} (the stage stopped before writing its outputs)"
    return summarize(ValidateResult.from_summary(path))


def _load_manifest(path: Path) -> pd.DataFrame:
    rerun = "run the data stage first (`cascade stage data` or `dvc repro data`)"
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        raise StageError(f"validate: no manifest at {path}; {rerun}") from None
    except (ValueError, OSError) as err:  # not parquet, or not a Cascade manifest
        raise StageError(f"validate: cannot read {path}: {_one_line(err)}; {rerun}") from None
    if manifest.empty:
        raise StageError(f"validate: {path} lists no items; {rerun} with a source that has data")
    keys = manifest["key"]
    if keys.isna().any() or keys.duplicated().any():
        dupes = sorted(set(keys[keys.duplicated()].dropna()))[:5]
        raise StageError(f"validate: {path} has null or duplicated keys {dupes}; {rerun} to rebuild it")
    return manifest


def _check_all(cfg: ValidateConfig, data_dir: Path, manifest: pd.DataFrame,
               progress: Callable[[int], None] | None = None) -> dict[int, Problem]:
    """Problems by manifest position; positions absent from the result are accepted."""
    position = {key: pos for pos, key in enumerate(manifest["key"])}
    problems: dict[int, Problem] = {}
    digests: dict[int, str] = {}
    has_shard = manifest["shard"].notna()
    for pos in np.flatnonzero(~has_shard.to_numpy()):  # nothing to read: judge from the manifest alone
        ingest = _ingest_problem(manifest.iloc[pos].get("ingest_error"))
        problems[int(pos)] = ingest or (MISSING_IMAGE, "no shard recorded for this item")
    _check_shards_inside(data_dir, manifest.loc[has_shard, "shard"])

    done = 0
    with _strict_pil(cfg.max_pixels):
        for done, (row, members) in enumerate(_read_items(data_dir, manifest[has_shard]), start=1):
            pos = position[row["key"]]
            problem, digest = _check_item(cfg, row, members)
            if problem:
                problems[pos] = problem
            else:
                digests[pos] = digest
            if progress and done % 256 == 0:
                progress(done)
    if progress:
        progress(done)

    kept: dict[str, str] = {}  # sha256 -> key of the accepted item that first had it
    for pos in sorted(digests):  # manifest order decides which copy is "earlier"
        key, digest = manifest["key"].iat[pos], digests[pos]
        if digest in kept:
            problems[pos] = (DUPLICATE_IMAGE, f"same image bytes (sha256 {digest[:16]}...) as {kept[digest]!r}")
        else:
            kept[digest] = key
    return problems


def _check_shards_inside(data_dir: Path, shards: pd.Series) -> None:
    """A manifest must not point validate at files outside its dataset directory."""
    root = data_dir.resolve()
    for shard in shards.unique():
        if not (root / shard).resolve().is_relative_to(root):
            raise StageError(f"validate: manifest shard path {shard!r} escapes {data_dir}; rebuild the dataset")


def _read_items(data_dir: Path, manifest: pd.DataFrame) -> Iterator[tuple[dict, dict[str, bytes]]]:
    try:
        yield from read_items(data_dir, manifest)
    except (OSError, tarfile.TarError) as err:  # a shard named by the manifest is missing or not a tar
        reason = _one_line(err)
        raise StageError(f"validate: cannot read the shards of {data_dir}: {reason}; rebuild the dataset") from None


def _check_item(cfg: ValidateConfig, row: dict, members: dict[str, bytes]) -> tuple[Problem | None, str | None]:
    """(first problem or None, sha256 of the image bytes when the item passed)."""
    ingest = _ingest_problem(row.get("ingest_error"))
    if ingest:
        return ingest, None
    key, member = row["key"], _text(row.get("image_member"))
    suffix = member[len(key) + 1 :] if member and member.startswith(f"{key}.") else None
    image = members.get(suffix) if suffix else None
    if image is None:
        where = f"member {member!r} not found" if member else "no image member"
        return (MISSING_IMAGE, f"{where} in {row['shard']}"), None
    problem = _check_image(member, image, cfg) or _check_caption(f"{key}.txt", members.get("txt"), cfg)
    return problem, None if problem else sha256_bytes(image)


def _ingest_problem(value: Any) -> Problem | None:
    value = _text(value)
    if value is None:
        return None
    code, sep, detail = value.partition(": ")
    if sep and _INGEST_CODE.fullmatch(code):
        return code, detail
    return INGEST_ERROR, value


@contextmanager
def _strict_pil(max_pixels: int) -> Iterator[None]:
    """Make PIL refuse what validate must catch: partial decodes and images over max_pixels."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to 2x the limit
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_image(name: str, data: bytes, cfg: ValidateConfig) -> Problem | None:
    if not data:
        return EMPTY_FILE, f"{name} is 0 bytes"
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # PIL's guard, set to max_pixels
        return DECOMPRESSION_BOMB, f"{name}: header over max_pixels {cfg.max_pixels}, not decoded ({err})"
    except UnidentifiedImageError:
        return NOT_AN_IMAGE, f"{name}: not a format PIL knows ({len(data)} bytes, starting {data[:16]!r})"
    except Exception as err:  # a recognised format whose header is cut short or corrupt; PIL raises many types
        return TRUNCATED_IMAGE, f"{name}: unreadable header: {err}"
    with im:
        width, height = im.size
        if width * height > cfg.max_pixels:  # normally PIL's guard fired already; ours does not depend on it
            return DECOMPRESSION_BOMB, f"{name}: header {width}x{height} > max_pixels {cfg.max_pixels}, not decoded"
        try:
            im.load()  # the one full decode; LOAD_TRUNCATED_IMAGES is off, so a partial file raises
        except Exception as err:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
            return TRUNCATED_IMAGE, f"{name}: decode failed: {err}"
        mode = im.mode
    if mode not in cfg.allowed_modes:
        return BAD_COLOR_MODE, f"{name}: mode {mode} (allowed: {', '.join(cfg.allowed_modes)})"
    short, long = min(width, height), max(width, height)
    if short < max(cfg.min_side, 1):  # a zero side is too small whatever min_side says
        return TOO_SMALL, f"{name}: {width}x{height}, shorter side {short} < min_side {cfg.min_side}"
    if long > cfg.max_side:
        return TOO_LARGE, f"{name}: {width}x{height}, longer side {long} > max_side {cfg.max_side}"
    ratio = long / short
    if ratio > cfg.max_aspect_ratio:
        return BAD_ASPECT_RATIO, f"{name}: {width}x{height}, {ratio:.2f} > max_aspect_ratio {cfg.max_aspect_ratio}"
    return None


def _check_caption(name: str, raw: bytes | None, cfg: ValidateConfig) -> Problem | None:
    if raw is None:
        return MISSING_CAPTION, f"no {name} member"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad_byte = raw[err.start : err.start + 1]
        return CAPTION_NOT_UTF8, f"{name}: byte {bad_byte!r} at offset {err.start} is not UTF-8 ({_shown(raw)})"
    caption = text.strip()
    if not caption:
        return MISSING_CAPTION, f"{name} is empty or whitespace-only"
    n = len(caption)
    if n < cfg.caption_min_chars:
        return CAPTION_TOO_SHORT, f"{name}: {n} chars < caption_min_chars {cfg.caption_min_chars} ({_shown(caption)})"
    if n > cfg.caption_max_chars:
        return CAPTION_TOO_LONG, f"{name}: {n} chars > caption_max_chars {cfg.caption_max_chars} ({_shown(caption)})"
    return None


def _check_partition(manifest: pd.DataFrame, accepted: pd.DataFrame, quarantine: pd.DataFrame) -> None:
    """Items in = accepted + quarantined, and the two key sets partition the manifest's keys."""
    keys, ok, bad = set(manifest["key"]), set(accepted["key"]), set(quarantine["key"])
    if len(manifest) != len(accepted) + len(quarantine) or ok & bad or ok | bad != keys:
        raise AssertionError(
            f"validate: accepted ({len(accepted)}) + quarantined ({len(quarantine)}) "
            f"do not partition the {len(manifest)} manifest items"
        )


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    """Most frequent first, ties by name: the order messages and summaries list reasons in."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _text(value: Any) -> str | None:
    """A manifest cell as str, or None when null (pandas gives NaN for missing strings)."""
    return None if value is None or pd.isna(value) else str(value)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _shown(value: str | bytes) -> str:
    shown = repr(value[:_SHOWN])
    return shown + "..." if len(value) > _SHOWN else shown
