"""The bad-input corpus, end to end: real user data -> `ingest` -> `validate` (library and CLI).

The tests build the corpus themselves, as a user would hand it over:

* a webdataset tar in img2dataset layout (KEY.jpg|KEY.png + KEY.txt + KEY.json) mixing 20 good
  items with a truncated JPEG, a zero-byte image, text named .png, a PNG whose header declares
  30000x30000 (signature + IHDR + IEND, never any pixels), a missing caption, a blank caption, a
  non-UTF-8 caption, a duplicate image, the members `../../evil.png` and `/etc/x.png`, a symlink
  member and a hardlink member;
* an image folder with metadata.jsonl carrying the cases that exist there (no non-UTF-8 caption:
  JSON cannot hold one), plus `file_name`s that escape the folder and one that does not exist.

Every bad item must land in quarantine.parquet with exactly its reason (matched through the
manifest's `source` column, i.e. by the name the user gave it), every good item must be accepted,
nothing may be written outside the output folders, and nothing may crash.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from components import validate
from components.config import load_config
from components.errors import StageError
from components.ingest import ingest
from components.io import read_manifest
from pipelines.cli import app
from tests.conftest import REPO

PARAMS = REPO / "params.yaml"
SMOKE = load_config(PARAMS, "smoke")
LENIENT = dataclasses.replace(SMOKE.validate, max_bad_fraction=0.9)  # the corpus is bad on purpose
N_GOOD = 20
TAR_NAME = "corpus.tar"


# --- building the corpus -------------------------------------------------------------------


def noise_image(seed: int, fmt: str = "PNG", size: tuple[int, int] = (32, 32), **save) -> bytes:
    """Random RGB pixels: every seed gives different bytes (and a different sha256)."""
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", size, pixels).save(buf, fmt, **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """Signature + IHDR (with its real CRC) + IEND: a PNG that claims width x height, has no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    whole = noise_image(777, "JPEG", (64, 64), quality=95)
    return whole[: len(whole) // 2]  # the header survives, the entropy-coded data is cut


GOOD_EXT = ["jpg" if i % 2 else "png" for i in range(N_GOOD)]
GOOD_IMAGES = [noise_image(i, "JPEG" if ext == "jpg" else "PNG") for i, ext in enumerate(GOOD_EXT)]
GOOD_CAPTIONS = [f"good picture number {i}".encode() for i in range(N_GOOD)]
DUPLICATED = 3  # the good item whose image bytes are copied later in the corpus
BOMB = png_header_only(30000, 30000)
TEXT_AS_PNG = b"I am a text file that someone named .png\n" * 3


def test_corpus_pieces_are_what_they_claim():
    """The corpus itself: the bomb is a tiny, well-formed header; the JPEG really is cut short."""
    assert len(BOMB) < 64
    assert zlib.crc32(BOMB[12:29]) == struct.unpack(">I", BOMB[29:33])[0]  # IHDR CRC is correct
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only to read the header back; nothing is decoded
    try:
        with Image.open(io.BytesIO(BOMB)) as im:
            assert im.size == (30000, 30000)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    with Image.open(io.BytesIO(truncated_jpeg())) as im:
        assert im.size == (64, 64)
        with pytest.raises(OSError):
            im.load()
    assert len(set(GOOD_IMAGES)) == N_GOOD


class TarBuilder:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def file(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def link(self, name: str, kind: bytes, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        self.tar.addfile(info)

    def item(self, key: str, image: bytes | None, ext: str, caption: bytes | None, meta: bool = True) -> None:
        if image is not None:
            self.file(f"{key}.{ext}", image)
        if caption is not None:
            self.file(f"{key}.txt", caption)
        if meta:
            self.file(f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def good_item(tar: TarBuilder, i: int) -> None:
    tar.item(f"{i:09d}", GOOD_IMAGES[i], GOOD_EXT[i], GOOD_CAPTIONS[i])


def build_webdataset(folder: Path, with_bad: bool = True) -> tuple[Path, dict[str, str], set[str]]:
    """(tar path, {source: expected reason}, {sources of good items}); bad items sit between good ones."""
    folder.mkdir(parents=True)
    tar = TarBuilder()
    caption = b"a caption that is fine"
    bad: list[tuple[str, str, object]] = [  # (key, reason, how to write it)
        ("truncated", "truncated_image", lambda k: tar.item(k, truncated_jpeg(), "jpg", caption)),
        ("zerobyte", "empty_file", lambda k: tar.item(k, b"", "png", caption)),
        ("textpng", "not_an_image", lambda k: tar.item(k, TEXT_AS_PNG, "png", caption)),
        ("bomb", "decompression_bomb", lambda k: tar.item(k, BOMB, "png", caption)),
        ("nocaption", "missing_caption", lambda k: tar.item(k, noise_image(501), "png", None)),
        ("blankcaption", "missing_caption", lambda k: tar.item(k, noise_image(502), "png", b" \n\t ")),
        ("badutf8", "caption_not_utf8", lambda k: tar.item(k, noise_image(503), "png", b"caf\xe9 with \xff bytes")),
        ("dupe", "duplicate_image", lambda k: tar.item(k, GOOD_IMAGES[DUPLICATED], GOOD_EXT[DUPLICATED], caption)),
        ("../../evil", "unsafe_member_name", lambda k: tar.file(f"{k}.png", noise_image(504))),
        ("/etc/x", "unsafe_member_name", lambda k: tar.file(f"{k}.png", noise_image(505))),
        ("link", "link_member", lambda k: (tar.link(f"{k}.png", tarfile.SYMTYPE, "/etc/passwd"),
                                           tar.file(f"{k}.txt", caption))),
        ("hard", "link_member", lambda k: tar.link(f"{k}.png", tarfile.LNKTYPE, f"{0:09d}.png")),
    ]
    expected: dict[str, str] = {}
    good: set[str] = set()
    # one bad item after each good one from the duplicated image's original on
    bad_at = {DUPLICATED + 1 + n: case for n, case in enumerate(bad)} if with_bad else {}
    for i in range(N_GOOD):
        good_item(tar, i)
        good.add(f"{TAR_NAME}:{i:09d}")
        if i in bad_at:
            key, reason, write = bad_at[i]
            write(key)
            expected[f"{TAR_NAME}:{key}"] = reason
    assert len(expected) == (len(bad) if with_bad else 0)
    path = folder / TAR_NAME
    path.write_bytes(tar.bytes())
    return path, expected, good


def build_imagefolder(folder: Path) -> tuple[dict[str, str], set[str]]:
    """An image folder + metadata.jsonl; ({source: expected reason}, {sources of good items})."""
    folder.mkdir(parents=True)
    lines: list[dict] = []
    good: set[str] = set()
    for i in range(N_GOOD):
        name = f"img{i:02d}.{GOOD_EXT[i]}"
        (folder / name).write_bytes(GOOD_IMAGES[i])
        lines.append({"file_name": name, "text": GOOD_CAPTIONS[i].decode()})
        good.add(name)
    files = {
        "zero.png": b"",
        "notimage.png": TEXT_AS_PNG,
        "truncated.jpg": truncated_jpeg(),
        "bomb.png": BOMB,
        "nocaption.png": noise_image(601),
        "blank.png": noise_image(602),
        "dupe.png": GOOD_IMAGES[DUPLICATED],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    expected = {
        "zero.png": "empty_file",
        "notimage.png": "not_an_image",
        "truncated.jpg": "truncated_image",
        "bomb.png": "decompression_bomb",
        "nocaption.png": "missing_caption",
        "blank.png": "missing_caption",
        "dupe.png": "duplicate_image",
        "ghost.png": "missing_image",  # listed, never written
    }
    records = {name: {"file_name": name, "text": "a caption that is fine"} for name in expected}
    del records["nocaption.png"]["text"]
    records["blank.png"]["text"] = "   "
    # Names that escape the folder: never opened, shown by their metadata line.
    escaping = ["../evil.png", "../../evil.png", "/etc/x.png", "sub/../../evil.png"]
    bad_lines = list(records.values()) + [{"file_name": name, "text": "escapes"} for name in escaping]
    # interleave: one bad line after every good one, so neighbours of bad lines are good
    merged: list[dict] = []
    for i, line in enumerate(lines):
        merged.append(line)
        if i < len(bad_lines):
            merged.append(bad_lines[i])
    merged += bad_lines[len(lines):]
    for line_no, record in enumerate(merged, 1):
        if record["file_name"] in escaping:
            expected[f"metadata.jsonl:{line_no}"] = "unsafe_member_name"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in merged))
    return expected, good


# --- watching the file system ----------------------------------------------------------------


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root (files, folders, links) with what would show a change."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            snap[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return snap


def changes_outside(before: dict, after: dict, allowed: tuple[str, ...]) -> dict:
    """Paths created, changed or removed anywhere but under the `allowed` top-level folders."""

    def outside(path: str) -> bool:
        return not any(path == a or path.startswith(a + os.sep) for a in allowed)

    keys = {k for k in before.keys() | after.keys() if outside(k)}
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def evil_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name in ("evil.png", "x.png")]


def reasons_by_source(result) -> dict[str, str]:
    quarantine = pq.read_table(result.quarantine_path).to_pandas()
    return dict(zip(quarantine["source"], quarantine["reason"]))


def shard_members(data_dir: Path) -> list[tarfile.TarInfo]:
    members = []
    for shard in sorted((data_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getmembers()
    return members


# --- the library path: ingest() then validate.run() -------------------------------------------


def _run_corpus(root: Path, source: Path) -> SimpleNamespace:
    """ingest + a lenient validate + a smoke-threshold validate, watched for writes and decodes."""
    data_dir, lenient_out, strict_out = root / "data", root / "validated", root / "validated_strict"
    etc_x_before = Path("/etc/x.png").exists()
    parent_before = sorted(os.listdir(root.parent))
    before = tree(root)
    decoded_sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spying_load(im):
        decoded_sizes.append(im.size)
        return real_load(im)

    d = SMOKE.data
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageFile.ImageFile, "load", spying_load)
        ingested = ingest(str(source), data_dir, d.shard_size, d.val_fraction, d.test_fraction)
        result = validate.run(LENIENT, data_dir, lenient_out)
        with pytest.raises(StageError) as failure:
            validate.run(SMOKE.validate, data_dir, strict_out)
    return SimpleNamespace(
        root=root, data_dir=data_dir, strict_out=strict_out, ingested=ingested, result=result,
        failure=failure.value, before=before, after=tree(root), parent_before=parent_before,
        parent_after=sorted(os.listdir(root.parent)), etc_x_before=etc_x_before,
        decoded_sizes=decoded_sizes, manifest=read_manifest(data_dir),
    )


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds_corpus")
    tar_path, expected, good = build_webdataset(root / "src")
    run = _run_corpus(root, tar_path)
    run.expected, run.good = expected, good
    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_corpus")
    expected, good = build_imagefolder(root / "src")
    run = _run_corpus(root, root / "src")
    run.expected, run.good = expected, good
    return run


@pytest.fixture(params=["wds", "folder"])
def corpus(request):
    return request.getfixturevalue(request.param)


def test_webdataset_corpus_covers_every_case(wds):
    reasons = set(wds.expected.values())
    assert reasons == {
        "truncated_image", "empty_file", "not_an_image", "decompression_bomb", "missing_caption",
        "caption_not_utf8", "duplicate_image", "unsafe_member_name", "link_member",
    }
    assert {"corpus.tar:../../evil", "corpus.tar:/etc/x", "corpus.tar:link"} <= set(wds.expected)
    assert wds.ingested.kind == "webdataset"


def test_every_bad_item_is_quarantined_with_exactly_its_reason(corpus):
    assert reasons_by_source(corpus.result) == corpus.expected


def test_every_good_item_is_accepted(corpus):
    accepted = pq.read_table(corpus.result.accepted_path).to_pandas()
    assert set(accepted["source"]) == corpus.good
    assert accepted["ingest_error"].isna().all()
    # the accepted copy of the duplicated image is the first one, the good item
    assert accepted["sha256"].is_unique


def test_accepted_and_quarantined_partition_the_manifest(corpus):
    result, manifest = corpus.result, corpus.manifest
    accepted = pq.read_table(result.accepted_path).to_pandas()
    quarantine = pq.read_table(result.quarantine_path).to_pandas()
    assert result.n_items == len(manifest) == corpus.ingested.n_items == len(corpus.good) + len(corpus.expected)
    assert result.n_items == result.n_accepted + result.n_quarantined
    assert (result.n_accepted, result.n_quarantined) == (len(corpus.good), len(corpus.expected))
    assert set(accepted["key"]).isdisjoint(quarantine["key"])
    assert set(accepted["key"]) | set(quarantine["key"]) == set(manifest["key"])
    assert manifest["source"].is_unique  # so mapping by source is mapping by item
    assert result.passed and result.gx_success


def test_details_name_the_problem(corpus):
    quarantine = pq.read_table(corpus.result.quarantine_path).to_pandas()
    details = dict(zip(quarantine["source"], quarantine["detail"]))
    assert all(isinstance(d, str) and d and "\n" not in d for d in details.values())
    bomb = next(s for s, r in corpus.expected.items() if r == "decompression_bomb")
    assert "max_pixels" in details[bomb]
    dupe = next(s for s, r in corpus.expected.items() if r == "duplicate_image")
    original = corpus.manifest.loc[corpus.manifest["sha256"] == quarantine.set_index("source").loc[dupe, "sha256"]]
    assert repr(original["key"].iloc[0]) in details[dupe]  # names the copy it kept


def test_webdataset_hostile_members_are_named_and_never_stored(wds):
    quarantine = pq.read_table(wds.result.quarantine_path).to_pandas().set_index("source")
    assert quarantine.loc["corpus.tar:../../evil", "detail"] == "../../evil.png"
    assert quarantine.loc["corpus.tar:/etc/x", "detail"] == "/etc/x.png"
    assert quarantine.loc["corpus.tar:link", "detail"] == "link.png -> /etc/passwd"
    hostile = ["corpus.tar:../../evil", "corpus.tar:/etc/x", "corpus.tar:link", "corpus.tar:hard"]
    assert quarantine.loc[hostile, "image_member"].isna().all()
    assert quarantine.loc[hostile, "sha256"].isna().all()


def test_output_shards_hold_only_plain_safely_named_files(corpus):
    members = shard_members(corpus.data_dir)
    assert members
    keys = set(corpus.manifest["key"])
    for info in members:
        assert info.isfile(), info.name
        assert "/" not in info.name and not info.name.startswith(".") and ".." not in info.name
        assert info.name.partition(".")[0] in keys


def test_nothing_is_written_outside_the_output_folders(corpus):
    assert changes_outside(corpus.before, corpus.after, ("data", "validated", "validated_strict")) == {}
    assert corpus.parent_after == corpus.parent_before
    assert evil_files(corpus.root.parent) == []
    assert Path("/etc/x.png").exists() == corpus.etc_x_before
    assert not (Path.cwd() / "../../evil.png").exists() and not (Path.cwd() / "evil.png").exists()
    created = set(corpus.after) - set(corpus.before)
    assert "data/manifest.parquet" in created and "validated/quarantine.parquet" in created


def test_the_bomb_is_never_decoded(corpus):
    assert corpus.decoded_sizes, "the spy saw no decodes at all"
    assert max(w * h for w, h in corpus.decoded_sizes) <= SMOKE.validate.max_pixels


def test_default_threshold_fails_with_one_line_after_writing_outputs(corpus):
    message = str(corpus.failure)
    assert "\n" not in message
    assert message.startswith("validate: ") and str(corpus.strict_out / "quarantine.parquet") in message
    assert f"max_bad_fraction {SMOKE.validate.max_bad_fraction:.1%}" in message
    for name in ("accepted.parquet", "quarantine.parquet", "summary.json", "data_docs/index.html"):
        assert (corpus.strict_out / name).is_file(), name
    summary = json.loads((corpus.strict_out / "summary.json").read_text())
    assert summary["passed"] is False and summary["n_quarantined"] == len(corpus.expected)
    strict_reasons = pq.read_table(corpus.strict_out / "quarantine.parquet").to_pandas()
    assert dict(zip(strict_reasons["source"], strict_reasons["reason"])) == corpus.expected


# --- the same corpus through the command line ----------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(app, ["--params", str(PARAMS), "--profile", "smoke", *map(str, args)])


def assert_no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and 'File "' not in text


def test_cli_ingest_then_validate_fails_with_one_error_line(tmp_path: Path):
    tar_path, expected, _ = build_webdataset(tmp_path / "src")
    parent_before = sorted(os.listdir(tmp_path.parent))
    before = tree(tmp_path)
    data = tmp_path / "data"

    ingested = cli("ingest", tar_path, "--out", data)
    assert ingested.exit_code == 0, ingested.output
    assert "items with ingest errors" in ingested.stdout and "unsafe_member_name 2" in ingested.stdout

    result = cli("validate", data)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: validate: ")
    assert str(data / "validation" / "quarantine.parquet") in error_lines[0]
    assert result.stdout.startswith("validate FAILED")  # the summary, read back from disk
    assert_no_traceback(ingested.output, result.output)

    quarantine = pq.read_table(data / "validation" / "quarantine.parquet").to_pandas()
    assert dict(zip(quarantine["source"], quarantine["reason"])) == expected
    assert changes_outside(before, tree(tmp_path), ("data",)) == {}
    assert sorted(os.listdir(tmp_path.parent)) == parent_before
    assert evil_files(tmp_path.parent) == []


def test_cli_clean_dataset_passes(tmp_path: Path):
    tar_path, expected, good = build_webdataset(tmp_path / "src", with_bad=False)
    assert expected == {}
    ingested = cli("ingest", tar_path, "--out", tmp_path / "data")
    assert ingested.exit_code == 0, ingested.output
    assert "ingest errors" not in ingested.stdout
    result = cli("validate", tmp_path / "data", "--out", tmp_path / "checked")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("validate PASSED") and result.stderr == ""
    accepted = pq.read_table(tmp_path / "checked" / "accepted.parquet").to_pandas()
    assert set(accepted["source"]) == good


def test_console_script_failure_is_one_line_on_stderr(wds, tmp_path: Path):
    """The real `cascade` process (not CliRunner): exit 1, one `error:` line, no traceback."""
    cascade = Path(sys.executable).with_name("cascade")
    if not cascade.exists():
        pytest.skip("the cascade console script is not installed next to this interpreter")
    proc = subprocess.run(
        [str(cascade), "--params", str(PARAMS), "--profile", "smoke", "validate", str(wds.data_dir),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "GX_ANALYTICS_ENABLED": "false"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: validate: "), proc.stderr
    assert_no_traceback(proc.stdout, proc.stderr)
    assert "validate FAILED" in proc.stdout
