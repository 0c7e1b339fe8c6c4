"""The Great Expectations suite over the accepted manifest, and its Data Docs.

`validate` checks every item itself (bytes, decoding, captions); this suite is the second, declarative
line of defence over the table it hands downstream: keys and hashes unique, splits known, captions
and sizes within the configured bounds. GX runs fully offline in an ephemeral (in-memory) context
with analytics and progress bars off; the only thing it writes is the Data Docs site, whose
`index.html` lands in the `docs_dir` the caller chooses.

great_expectations is imported inside the functions: it takes seconds to import, and commands that
never validate (e.g. `cascade --help`) should not pay for that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.config import ValidateConfig
from components.io import SPLITS

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations import ExpectationSuite

# No usage statistics, ever: the platform must run air-gapped (the context config says so too).
os.environ["GX_ANALYTICS_ENABLED"] = "false"

SUITE_NAME = "cascade_accepted_manifest"
DOCS_SITE = "cascade"
_SAMPLE = 5  # offending values kept per failed expectation in the compact results


def build_suite(cfg: ValidateConfig) -> "ExpectationSuite":
    """The expectations every accepted manifest must meet, with bounds from `cfg`."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=[
            gxe.ExpectColumnValuesToNotBeNull(column="key"),
            gxe.ExpectColumnValuesToBeUnique(column="key"),
            gxe.ExpectColumnValuesToNotBeNull(column="shard"),
            gxe.ExpectColumnValuesToNotBeNull(column="split"),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            gxe.ExpectColumnValuesToNotBeNull(column="sha256"),
            gxe.ExpectColumnValuesToBeUnique(column="sha256"),
            gxe.ExpectColumnValuesToNotBeNull(column="caption"),
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="caption", min_value=cfg.caption_min_chars, max_value=cfg.caption_max_chars
            ),
            gxe.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_side, max_value=cfg.max_side),
            gxe.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_side, max_value=cfg.max_side),
        ],
    )


def run_suite(df: "pd.DataFrame", cfg: ValidateConfig, docs_dir: Path) -> tuple[bool, dict[str, Any]]:
    """Validate `df` against `build_suite(cfg)` and build Data Docs into `docs_dir`.

    Returns (success, results) where results maps "expectation_type:column" to
    {"success", "unexpected_count", "unexpected_sample"}: small enough for summary.json.
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    docs_dir = Path(docs_dir).resolve()
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites={
                DOCS_SITE: {
                    "class_name": "SiteBuilder",
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                }
            },
        ),
    )
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("accepted")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(build_suite(cfg))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="accepted", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            result_format="SUMMARY",
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": df})

    results: dict[str, Any] = {}
    for suite_result in outcome.run_results.values():
        for r in suite_result.results:
            config = r.expectation_config
            details = r.result or {}
            results[f"{config.type}:{config.kwargs.get('column')}"] = {
                "success": bool(r.success),
                "unexpected_count": int(details.get("unexpected_count") or 0),
                "unexpected_sample": [_plain(v) for v in (details.get("partial_unexpected_list") or [])[:_SAMPLE]],
            }
    return bool(outcome.success), results


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of one offending value (numpy scalars -> Python, others -> str)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
