"""Promotion gates (pure) and their application to a real (private, SQLite) MLflow registry."""

from __future__ import annotations

import math

import mlflow
import pytest

from components import registry
from components.config import GatesConfig
from components.errors import StageError

GOOD = {"fid": 50.0, "clip_score": 0.30, "checker_single": 0.60, "checker_pair": 0.40}


def gates(primary: str = "checker_single", margin: float = 0.01, **limits) -> GatesConfig:
    base = {"max_fid": 100.0, "min_clip_score": 0.2, "min_checker_single": 0.5}
    return GatesConfig(**(base | limits), primary=primary, margin=margin)


def failed(decision: registry.Decision) -> list[str]:
    return [r for r in decision.reasons if r.startswith("FAIL")]


# --- decide --------------------------------------------------------------------------------------


def test_no_champion_promotes_when_the_thresholds_pass():
    d = registry.decide(GOOD, None, gates())
    assert d.promote and d.alias == "champion" and not failed(d)
    assert any("no current champion" in r for r in d.reasons)
    assert sum(r.startswith("pass") for r in d.reasons) == 3  # one line per threshold


@pytest.mark.parametrize("metric, value, limit", [("fid", 150.0, "max_fid"), ("clip_score", 0.1, "min_clip_score"),
                                                  ("checker_single", 0.4, "min_checker_single")])
def test_each_threshold_blocks_promotion(metric, value, limit):
    d = registry.decide(GOOD | {metric: value}, None, gates())
    assert not d.promote and d.alias == "challenger"
    assert len(failed(d)) == 1 and metric in failed(d)[0] and limit in failed(d)[0]


def test_thresholds_are_inclusive():
    assert registry.decide(GOOD | {"fid": 100.0, "checker_single": 0.5}, None, gates()).promote


@pytest.mark.parametrize("primary, better, worse", [
    ("fid", 40.0, 49.995),  # lower is better: 10 better passes, 0.005 better is within the margin
    ("checker_single", 0.62, 0.605),  # higher is better
    ("clip_score", 0.35, 0.305),
])
def test_the_primary_metric_must_beat_the_champion_by_more_than_the_margin(primary, better, worse):
    champion = GOOD
    assert registry.decide(GOOD | {primary: better}, champion, gates(primary)).promote
    d = registry.decide(GOOD | {primary: worse}, champion, gates(primary))
    assert not d.promote and d.alias == "challenger"
    assert len(failed(d)) == 1 and "champion" in failed(d)[0] and primary in failed(d)[0]


@pytest.mark.parametrize("primary, regressed", [("fid", 60.0), ("checker_pair", 0.3)])
def test_a_regression_against_the_champion_never_promotes(primary, regressed):
    d = registry.decide(GOOD | {primary: regressed}, GOOD, gates(primary, margin=0.0))
    assert not d.promote


def test_equal_metrics_with_zero_margin_do_not_promote():
    d = registry.decide(GOOD, GOOD, gates(margin=0.0))
    assert not d.promote and "<= margin" in failed(d)[0]


def test_a_champion_without_the_primary_metric_leaves_it_to_the_thresholds():
    d = registry.decide(GOOD, {"fid": 10.0}, gates("checker_single"))
    assert d.promote and any("no finite checker_single" in r for r in d.reasons)


@pytest.mark.parametrize("metric", sorted(registry.HIGHER_IS_BETTER))
@pytest.mark.parametrize("bad", [math.nan, None])
def test_a_missing_or_nan_metric_never_promotes(metric, bad):
    candidate = dict(GOOD)
    if bad is None:
        del candidate[metric]
    else:
        candidate[metric] = bad
    # primary checker_pair and a checker threshold: every gate metric is in use
    d = registry.decide(candidate, None, gates("checker_pair", max_fid=math.inf, min_clip_score=-math.inf,
                                               min_checker_single=-1))
    assert not d.promote and d.alias == "challenger"
    assert any(metric in r and ("missing" in r or "nan" in r) for r in failed(d))


def test_without_a_checker_gate_data_without_scenes_can_promote():
    """User data has no scenes, so no checker figures: min_checker_single null drops that gate."""
    candidate = {"fid": 50.0, "clip_score": 0.30}
    assert not registry.decide(candidate, None, gates("fid")).promote
    d = registry.decide(candidate, None, gates("fid", min_checker_single=None))
    assert d.promote and not failed(d)
    assert not registry.decide(candidate, None, gates("checker_single", min_checker_single=None)).promote


def test_a_failed_evaluation_never_promotes_even_with_good_metrics():
    d = registry.decide(GOOD, None, gates(), failure="evaluator ran out of memory")
    assert not d.promote and "evaluator ran out of memory" in failed(d)[0]


# --- registry ------------------------------------------------------------------------------------

NAME = "cascade-test"


def new_version(client, metrics: dict) -> str:
    """A registered version carrying metric tags, without logging a real model (cheap)."""
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    run = client.create_run("0")  # the default experiment; fluent runs would reuse an earlier test's experiment id
    tags = {f"metric.{k}": repr(v) for k, v in metrics.items()}
    return str(client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id, tags=tags).version)


def alias_version(client, alias: str) -> str:
    return str(client.get_model_version_by_alias(NAME, alias).version)


def test_apply_decision_sets_the_alias_and_records_why(mlflow_uri):
    client = mlflow.MlflowClient()
    v1 = new_version(client, GOOD)
    registry.apply_decision(client, NAME, v1, registry.decide(GOOD, None, gates()))
    mv = client.get_model_version(NAME, v1)
    assert mv.aliases == ["champion"] and mv.tags["cascade.decision"] == "promoted"
    assert "no current champion" in mv.tags["cascade.decision_reasons"] and "cascade.forced_reason" not in mv.tags
    assert registry.champion_metrics(client, NAME) == (v1, GOOD)


def test_promote_moves_the_champion_only_past_the_gates(mlflow_uri):
    client = mlflow.MlflowClient()
    v1 = new_version(client, GOOD)
    assert registry.promote(NAME, v1, gates()).promote
    v2 = new_version(client, GOOD)  # no better than v1
    d = registry.promote(NAME, v2, gates())
    assert not d.promote
    assert alias_version(client, "champion") == v1
    assert alias_version(client, "challenger") == v2
    assert client.get_model_version(NAME, v2).tags["cascade.decision"] == "rejected"
    v3 = new_version(client, GOOD | {"checker_single": 0.9})
    assert registry.promote(NAME, v3, gates()).promote
    assert alias_version(client, "champion") == v3
    assert client.get_model_version(NAME, v1).aliases == []


def test_force_needs_a_reason_and_records_it(mlflow_uri):
    client = mlflow.MlflowClient()
    v1 = new_version(client, GOOD)
    registry.promote(NAME, v1, gates())
    v2 = new_version(client, GOOD | {"fid": math.nan})
    assert not registry.promote(NAME, v2, gates()).promote  # NaN never passes the gates
    for reason in (None, "  "):
        with pytest.raises(StageError, match="--reason"):
            registry.promote(NAME, v2, gates(), force=True, reason=reason)
    d = registry.promote(NAME, v2, gates(), force=True, reason="hotfix for the demo")
    assert d.promote and d.reasons[-1] == "forced: hotfix for the demo"
    mv = client.get_model_version(NAME, v2)
    assert mv.aliases == ["champion"]  # the challenger alias it held moved with the promotion
    assert mv.tags["cascade.decision"] == "forced" and mv.tags["cascade.forced_reason"] == "hotfix for the demo"
    assert "FAIL: fid is nan" in mv.tags["cascade.decision_reasons"]


def test_promote_refuses_unknown_versions_and_the_current_champion(mlflow_uri):
    client = mlflow.MlflowClient()
    v1 = new_version(client, GOOD)
    registry.promote(NAME, v1, gates())
    for name, version in ((NAME, "99"), ("no-such-model", "1")):
        with pytest.raises(StageError, match="has no version"):
            registry.promote(name, version, gates())
    with pytest.raises(StageError, match="already is the champion"):
        registry.promote(NAME, v1, gates())
