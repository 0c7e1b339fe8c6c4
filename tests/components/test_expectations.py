import pytest

from components.config import ValidateConfig
from components.expectations import build_suite, run_suite
from components.io import manifest_frame

CFG = ValidateConfig(
    min_side=16,
    max_side=256,
    max_aspect_ratio=3.0,
    max_pixels=1_000_000,
    allowed_modes=("RGB",),
    caption_min_chars=3,
    caption_max_chars=20,
    max_bad_fraction=0.05,
)


def _row(i: int, **changes) -> dict:
    row = {
        "key": f"k{i}", "shard": "shards/train-000000.tar", "image_member": f"k{i}.png",
        "caption": f"caption {i}", "width": 32, "height": 32, "sha256": f"{i:064x}", "split": "train",
        "scene": None, "source": f"src{i}", "ingest_error": None,
    }
    return row | changes


def _failed(results: dict) -> set[str]:
    return {name for name, r in results.items() if not r["success"]}


def test_clean_manifest_passes_and_data_docs_are_built(tmp_path, capsys):
    ok, results = run_suite(manifest_frame([_row(i) for i in range(4)]), CFG, tmp_path / "docs")
    assert ok and not _failed(results)
    assert (tmp_path / "docs" / "index.html").is_file()
    assert capsys.readouterr().out == ""  # no progress bars or banners on stdout


def test_duplicate_keys_fail_and_name_the_key(tmp_path):
    ok, results = run_suite(manifest_frame([_row(0), _row(1, key="k0")]), CFG, tmp_path / "docs")
    assert not ok
    assert _failed(results) == {"expect_column_values_to_be_unique:key"}
    assert results["expect_column_values_to_be_unique:key"]["unexpected_sample"] == ["k0", "k0"]
    assert (tmp_path / "docs" / "index.html").is_file()  # failures are documented too


@pytest.mark.parametrize(
    "changes, expectation",
    [
        ({"split": "holdout"}, "expect_column_values_to_be_in_set:split"),
        ({"shard": None}, "expect_column_values_to_not_be_null:shard"),
        ({"sha256": f"{0:064x}"}, "expect_column_values_to_be_unique:sha256"),
        ({"caption": None}, "expect_column_values_to_not_be_null:caption"),
        ({"caption": "x" * 21}, "expect_column_value_lengths_to_be_between:caption"),
        ({"width": 8}, "expect_column_values_to_be_between:width"),
        ({"height": 300}, "expect_column_values_to_be_between:height"),
    ],
)
def test_each_expectation_catches_its_violation(tmp_path, changes, expectation):
    ok, results = run_suite(manifest_frame([_row(0), _row(1, **changes)]), CFG, tmp_path / "docs")
    assert not ok
    assert expectation in _failed(results)
    assert results[expectation]["unexpected_count"] >= 1


def test_suite_bounds_come_from_the_config():
    by_name = {f"{e.expectation_type}:{e.column}": e for e in build_suite(CFG).expectations}
    caption = by_name["expect_column_value_lengths_to_be_between:caption"]
    width = by_name["expect_column_values_to_be_between:width"]
    assert (caption.min_value, caption.max_value) == (3, 20)
    assert (width.min_value, width.max_value) == (16, 256)
