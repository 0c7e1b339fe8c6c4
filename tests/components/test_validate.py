import dataclasses
import io
import json
import random
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from components import validate
from components.config import ValidateConfig, load_config
from components.errors import StageError
from components.io import MANIFEST_FILE, MANIFEST_SCHEMA, Sample, ShardWriter, read_manifest, write_manifest

CFG = ValidateConfig(
    min_side=16,
    max_side=256,
    max_aspect_ratio=3.0,
    max_pixels=1_000_000,
    allowed_modes=("RGB", "RGBA", "L", "P"),
    caption_min_chars=3,
    caption_max_chars=100,
    max_bad_fraction=1.0,  # the bad-item fixture is mostly bad on purpose
)


def _noise(size=(32, 32), seed=0, fmt="PNG", mode="RGB", **save) -> bytes:
    """Random pixels, so every seed gives different bytes (and a different sha256)."""
    bytes_per_pixel = len(Image.new(mode, (1, 1)).tobytes())
    pixels = random.Random(seed).randbytes(size[0] * size[1] * bytes_per_pixel)
    buf = io.BytesIO()
    Image.frombytes(mode, size, pixels).save(buf, fmt, **save)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (valid CRCs) with no real pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    whole = _noise((64, 64), seed=7, fmt="JPEG", quality=95)
    return whole[: len(whole) // 2]  # the header survives, the scan data is cut


NOISE = object()  # _item's default: a fine 32x32 PNG of its own


def _item(key, split="train", image=NOISE, ext="png", caption=b"a fine caption", ingest_error=None) -> Sample:
    image = _noise(seed=1000 + zlib.crc32(key.encode())) if image is NOISE else image
    return Sample(key=key, split=split, image=image, image_ext=None if image is None else ext,
                  caption=caption, ingest_error=ingest_error)


SPLITS = ("train", "val", "test")
GOOD = [_item(f"good_{i}", split=SPLITS[i % 3], image=_noise(seed=i), caption=f"noise picture {i}".encode())
        for i in range(6)]
SAME_A, SAME_B = _noise(seed=100), _noise(seed=101)

# key -> the one reason it must be quarantined with. Most differ from a good item in one way; the
# *_and_* items, link_with_image and unsafe_name fail several checks, which pins the check order.
BAD = {
    "truncated_jpeg": (_item("truncated_jpeg", image=_truncated_jpeg(), ext="jpg"), "truncated_image"),
    "zero_bytes": (_item("zero_bytes", image=b""), "empty_file"),
    "text_as_png": (_item("text_as_png", image=b"hello, I am text, not a picture\n"), "not_an_image"),
    "bomb": (_item("bomb", image=_png_header_only(30000, 30000)), "decompression_bomb"),
    "bomb_just_over": (_item("bomb_just_over", image=_png_header_only(1100, 1000)), "decompression_bomb"),
    "no_image": (_item("no_image", image=None), "missing_image"),
    "no_caption": (_item("no_caption", caption=None), "missing_caption"),
    "blank_caption": (_item("blank_caption", caption=b" \n\t "), "missing_caption"),
    "caption_not_utf8": (_item("caption_not_utf8", caption=b"\xff\xfe bad"), "caption_not_utf8"),
    "caption_short": (_item("caption_short", caption=b"  ab  "), "caption_too_short"),
    "caption_long": (_item("caption_long", caption=b"x" * 101), "caption_too_long"),
    "too_small": (_item("too_small", image=_noise((8, 8))), "too_small"),
    "too_large": (_item("too_large", image=_noise((300, 200))), "too_large"),
    "aspect": (_item("aspect", image=_noise((128, 16))), "bad_aspect_ratio"),
    "cmyk": (_item("cmyk", image=_noise(fmt="JPEG", mode="CMYK"), ext="jpg"), "bad_color_mode"),
    "gray16": (_item("gray16", image=_noise(mode="I;16")), "bad_color_mode"),
    "cmyk_and_tiny": (_item("cmyk_and_tiny", image=_noise((8, 8), fmt="JPEG", mode="CMYK"), ext="jpg"),
                      "bad_color_mode"),
    "tiny_and_no_caption": (_item("tiny_and_no_caption", image=_noise((8, 8)), caption=None), "too_small"),
    "unsafe_name": (_item("unsafe_name", image=None, caption=None,
                          ingest_error="unsafe_member_name: ../../evil.png"), "unsafe_member_name"),
    "link_with_image": (_item("link_with_image", ingest_error="link_member: evil.png -> /etc/passwd"), "link_member"),
    "uncoded_ingest": (_item("uncoded_ingest", ingest_error="something went wrong"), "ingest_error"),
    # the first holder of SAME_B is rejected, so the second one is the first *accepted* copy
    "b_first_rejected": (_item("b_first_rejected", image=SAME_B, caption=None), "missing_caption"),
    # SAME_A's first holder is in `val`, whose shard is read after `train`'s: manifest order must win
    "a_copy": (_item("a_copy", split="train", image=SAME_A), "duplicate_image"),
}
ACCEPTED_KEYS = {s.key for s in GOOD} | {"a_original", "b_second_accepted"}


def _write_dataset(root: Path, samples: list[Sample], shard_size: int = 4) -> Path:
    with ShardWriter(root, shard_size) as writer:
        for sample in samples:
            writer.write(sample)
    return root


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """One validate run over good items plus one of each bad kind, watched for decodes and writes."""
    root = tmp_path_factory.mktemp("bad_run")
    # manifest order: a_original before a_copy, b_first_rejected before b_second_accepted
    samples = [*GOOD, _item("a_original", split="val", image=SAME_A), *(sample for sample, _ in BAD.values()),
               _item("b_second_accepted", image=SAME_B)]
    data_dir = _write_dataset(root / "data", samples)
    out_dir = root / "out"
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def spying_load(im):
        decoded_sizes.append(im.size)
        return real_load(im)

    before = _files(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageFile.ImageFile, "load", spying_load)
        result = validate.run(CFG, data_dir, out_dir)
    return SimpleNamespace(data_dir=data_dir, out_dir=out_dir, result=result, before=before,
                           after=_files(root), decoded_sizes=decoded_sizes, n_items=len(samples))


def test_every_bad_item_is_quarantined_with_exactly_its_reason(bad_run):
    quarantine = pq.read_table(bad_run.result.quarantine_path).to_pandas()
    assert dict(zip(quarantine["key"], quarantine["reason"])) == {key: reason for key, (_, reason) in BAD.items()}
    assert quarantine["detail"].str.len().min() > 0
    details = dict(zip(quarantine["key"], quarantine["detail"]))
    assert "'a_original'" in details["a_copy"]  # names the key it duplicates
    assert details["unsafe_name"] == "../../evil.png"
    assert "8x8" in details["too_small"] and "128x16" in details["aspect"] and "CMYK" in details["cmyk"]
    assert "\\xff" in details["caption_not_utf8"]


def test_accepted_and_quarantined_partition_the_manifest(bad_run):
    result = bad_run.result
    manifest = read_manifest(bad_run.data_dir)
    accepted = pq.read_table(result.accepted_path).to_pandas()
    quarantine = pq.read_table(result.quarantine_path).to_pandas()
    assert set(accepted["key"]) == ACCEPTED_KEYS
    assert set(accepted["key"]).isdisjoint(quarantine["key"])
    assert set(accepted["key"]) | set(quarantine["key"]) == set(manifest["key"])
    assert result.n_items == bad_run.n_items == result.n_accepted + result.n_quarantined
    assert (result.n_accepted, result.n_quarantined) == (len(accepted), len(quarantine))
    assert sum(result.reason_counts.values()) == result.n_quarantined
    assert result.reason_counts["decompression_bomb"] == 2 and result.reason_counts["bad_color_mode"] == 3


def test_outputs_keep_the_manifest_schema_and_relative_shard_paths(bad_run):
    manifest_schema = pq.read_schema(bad_run.data_dir / MANIFEST_FILE).remove_metadata()
    assert pq.read_schema(bad_run.result.accepted_path).remove_metadata() == manifest_schema
    quarantine_schema = pq.read_schema(bad_run.result.quarantine_path)
    assert quarantine_schema.names == [*manifest_schema.names, "reason", "detail"]
    accepted = pq.read_table(bad_run.result.accepted_path).to_pandas()
    assert all((bad_run.data_dir / shard).is_file() for shard in accepted["shard"])


def test_summary_and_metrics_report_the_run(bad_run):
    result = bad_run.result
    summary = json.loads(result.summary_path.read_text())
    assert summary["n_items"] == result.n_items and summary["n_quarantined"] == result.n_quarantined
    assert summary["reason_counts"] == result.reason_counts
    assert summary["bad_fraction"] == pytest.approx(result.n_quarantined / result.n_items)
    assert summary["max_bad_fraction"] == 1.0 and summary["passed"] is True
    assert summary["gx_success"] is True and summary["data_dir"] == str(bad_run.data_dir)
    assert result.metrics["quarantined_truncated_image"] == 1.0
    assert result.metrics["n_accepted"] == float(len(ACCEPTED_KEYS))
    text = validate.summarize(result)
    assert "PASSED" in text and str(result.quarantine_path) in text and "truncated_image 1" in text


def test_data_docs_index_is_written(bad_run):
    assert bad_run.result.data_docs_index == bad_run.out_dir / "data_docs" / "index.html"
    assert "<html" in bad_run.result.data_docs_index.read_text().lower()


def test_nothing_is_written_outside_out_dir(bad_run):
    outside_after = {p: stat for p, stat in bad_run.after.items() if not p.startswith("out/")}
    assert outside_after == bad_run.before  # the dataset is untouched, nothing new beside it


def test_headers_over_max_pixels_are_never_decoded(bad_run):
    assert bad_run.decoded_sizes, "the spy saw no decodes at all"
    assert max(w * h for w, h in bad_run.decoded_sizes) <= CFG.max_pixels


def test_too_many_bad_items_fails_after_writing_every_output(bad_run, tmp_path):
    strict = dataclasses.replace(CFG, max_bad_fraction=0.05)
    with pytest.raises(StageError) as info:
        validate.run(strict, bad_run.data_dir, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert "max_bad_fraction 5.0%" in message and "top reasons: " in message
    assert str(tmp_path / "out" / "quarantine.parquet") in message
    for name in ("accepted.parquet", "quarantine.parquet", "summary.json", "data_docs/index.html"):
        assert (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["passed"] is False
    # what the CLI prints after the error: the same summary, read back from disk
    text = validate.summarize_dir(tmp_path / "out")
    assert text.startswith("validate FAILED") and "bad_color_mode 3, missing_caption 3, decompression_bomb 2" in text


def test_clean_dataset_passes_with_the_params_yaml_config(tmp_path):
    cfg = load_config(profile="smoke").validate
    data_dir = _write_dataset(tmp_path / "data", GOOD)
    seen: list[int] = []
    result = validate.run(cfg, data_dir, tmp_path / "out", progress=seen.append)
    assert result.passed and result.gx_success
    assert (result.n_items, result.n_quarantined, result.reason_counts) == (len(GOOD), 0, {})
    assert seen and seen[-1] == len(GOOD)  # the progress bar ends at the item count
    assert pq.read_table(result.quarantine_path).num_rows == 0


def test_gx_suite_failure_fails_the_stage(tmp_path):
    # The manifest claims a width the shard's image does not have: the item checks (which read the
    # image itself) pass, the suite over the manifest must not.
    data_dir = _write_dataset(tmp_path / "data", GOOD)
    manifest = read_manifest(data_dir)
    manifest.loc[0, "width"] = 99_999
    write_manifest(manifest, data_dir / MANIFEST_FILE, schema=MANIFEST_SCHEMA)
    with pytest.raises(StageError, match=r"Great Expectations suite failed .*width"):
        validate.run(CFG, data_dir, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gx_success"] is False and summary["passed"] is False and summary["n_quarantined"] == 0
    assert not summary["gx_expectations"]["expect_column_values_to_be_between:width"]["success"]


def test_truncated_images_are_caught_even_if_someone_enabled_lenient_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    data_dir = _write_dataset(tmp_path / "data", [*GOOD, BAD["truncated_jpeg"][0]])
    result = validate.run(CFG, data_dir, tmp_path / "out")
    assert result.reason_counts == {"truncated_image": 1}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # PIL's settings are restored afterwards
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(StageError, match=r"no manifest at .*run the data stage"):
        validate.run(CFG, tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_manifest_fails(tmp_path):
    data_dir = _write_dataset(tmp_path / "data", [])
    with pytest.raises(StageError, match="lists no items"):
        validate.run(CFG, data_dir, tmp_path / "out")


def test_duplicate_manifest_keys_fail(tmp_path):
    data_dir = _write_dataset(tmp_path / "data", GOOD[:2])
    manifest = read_manifest(data_dir)
    manifest.loc[1, "key"] = manifest.loc[0, "key"]
    write_manifest(manifest, data_dir / MANIFEST_FILE, schema=MANIFEST_SCHEMA)
    with pytest.raises(StageError, match="duplicated keys"):
        validate.run(CFG, data_dir, tmp_path / "out")


def test_missing_shard_fails_with_one_line(tmp_path):
    data_dir = _write_dataset(tmp_path / "data", GOOD)
    next((data_dir / "shards").glob("*.tar")).unlink()
    with pytest.raises(StageError, match="cannot read the shards") as info:
        validate.run(CFG, data_dir, tmp_path / "out")
    assert "\n" not in str(info.value)


def test_shard_paths_escaping_the_dataset_are_refused(tmp_path):
    data_dir = _write_dataset(tmp_path / "data", GOOD[:1])
    manifest = read_manifest(data_dir)
    manifest.loc[0, "shard"] = "../../elsewhere.tar"
    write_manifest(manifest, data_dir / MANIFEST_FILE, schema=MANIFEST_SCHEMA)
    with pytest.raises(StageError, match="escapes"):
        validate.run(CFG, data_dir, tmp_path / "out")


def test_rows_without_a_shard_are_quarantined_not_dropped(tmp_path):
    data_dir = _write_dataset(tmp_path / "data", GOOD)
    manifest = read_manifest(data_dir)
    manifest.loc[0, "shard"] = None
    manifest.loc[1, ["shard", "ingest_error"]] = [None, "unreadable_source: s3://bucket/x.png timed out"]
    write_manifest(manifest, data_dir / MANIFEST_FILE, schema=MANIFEST_SCHEMA)
    result = validate.run(CFG, data_dir, tmp_path / "out")
    quarantine = pq.read_table(result.quarantine_path).to_pandas()
    assert dict(zip(quarantine["key"], quarantine["reason"])) == {"good_0": "missing_image",
                                                                  "good_1": "unreadable_source"}
    assert result.n_accepted == len(GOOD) - 2


def test_summarize_dir_without_outputs_says_so(tmp_path):
    assert "no summary.json" in validate.summarize_dir(tmp_path)


# mlflow.log_input hints that integer columns cannot hold missing values; not this test's concern
@pytest.mark.filterwarnings("ignore:Hint. Inferred schema contains integer:UserWarning")
def test_execute_tracks_the_run_and_writes_the_metrics_file(tmp_path, mlflow_uri):
    cfg = load_config(profile="smoke")
    data_dir = _write_dataset(tmp_path / "data", GOOD)
    result = validate.execute(cfg, data_dir, tmp_path / "out", tmp_path / "metrics" / "validate.json")
    assert result.passed
    assert json.loads((tmp_path / "metrics" / "validate.json").read_text())["n_accepted"] == len(GOOD)
