"""Promotion gates and the MLflow registry operations that apply them.

A registered version carries its evaluation metrics as tags `metric.<name>`. `decide` compares a
candidate's metrics with absolute thresholds and with the current champion's; the result becomes
the alias `champion` (gates passed) or `challenger`, and tags recording the decision and why.
The `register` stage and `cascade promote` use the same gates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from components.config import GatesConfig
from components.errors import StageError

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG = "metric."
FAILURE_TAG = "cascade.evaluation_failure"
# the gate metrics and their direction; those the gates use must be present and finite (an incomplete
# evaluation never promotes)
HIGHER_IS_BETTER = {"fid": False, "clip_score": True, "checker_single": True, "checker_pair": True}
TAG_LIMIT = 5000  # MLflow's maximum tag value length


@dataclass(frozen=True)
class Decision:
    promote: bool
    alias: str  # CHAMPION | CHALLENGER
    reasons: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return "promoted" if self.promote else "rejected"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def decide(candidate: dict, champion: dict | None, gates: GatesConfig, failure: str | None = None) -> Decision:
    """Every check is run and explained; the candidate is promoted only if all pass.

    failure: why evaluation failed, if it did (then nothing promotes, whatever the metrics say).
    """
    reasons, ok = [], True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok &= passed
        reasons.append(f"{'pass' if passed else 'FAIL'}: {text}")

    if failure:
        check(False, f"evaluation failed: {failure}")
    # checker figures exist only for data with scenes (the built-in set); null min_checker_single drops them
    required = ["fid", "clip_score"] + (["checker_single"] if gates.min_checker_single is not None else [])
    for name in dict.fromkeys(required + [gates.primary]):
        if not _finite(candidate.get(name)):
            check(False, f"{name} is {'missing' if candidate.get(name) is None else candidate[name]}: "
                         "an incomplete evaluation never promotes")
    for name, limit, higher in (("fid", gates.max_fid, False), ("clip_score", gates.min_clip_score, True),
                                ("checker_single", gates.min_checker_single, True)):
        value = candidate.get(name)
        if limit is not None and _finite(value):
            passed = value >= limit if higher else value <= limit
            sign = (">=" if passed else "<") if higher else ("<=" if passed else ">")
            check(passed, f"{name} {value:.4g} {sign} {'min' if higher else 'max'}_{name} {limit:.4g}")
    primary, value = gates.primary, candidate.get(gates.primary)
    if champion is None:
        reasons.append("no current champion: the thresholds decide")
    elif not _finite(champion.get(primary)):
        reasons.append(f"the champion has no finite {primary}: the thresholds decide")
    elif _finite(value):
        gain = value - champion[primary] if HIGHER_IS_BETTER[primary] else champion[primary] - value
        check(gain > gates.margin, f"{primary} {value:.4g} vs champion {champion[primary]:.4g}: improvement "
                                   f"{gain:.4g} {'>' if gain > gates.margin else '<='} margin {gates.margin:.4g}")
    return Decision(ok, CHAMPION if ok else CHALLENGER, reasons)


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    """`metric.<name>` tags of a model version as floats (unparsable values become NaN)."""
    out = {}
    for key, text in tags.items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG):]] = float(text)
            except ValueError:
                out[key[len(METRIC_TAG):]] = math.nan
    return out


def champion_metrics(client, name: str) -> tuple[str, dict[str, float]] | None:
    """(version, metrics) of the version holding the champion alias, or None if there is none."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such alias (or model) yet
        return None
    return str(version.version), metrics_from_tags(version.tags)


def apply_decision(client, name: str, version: str | int, decision: Decision, forced_reason: str | None = None) -> None:
    """Move the decided alias to this version and record the decision and its reasons as tags."""
    version = str(version)
    if decision.alias == CHAMPION:
        # the alias moves atomically; a stale challenger alias on this version would now be a lie
        current = client.get_model_version(name, version).aliases
        if CHALLENGER in current:
            client.delete_registered_model_alias(name, CHALLENGER)
    client.set_registered_model_alias(name, decision.alias, version)
    tags = {"cascade.decision": "forced" if forced_reason else decision.outcome,
            "cascade.decision_reasons": "; ".join(decision.reasons)}
    if forced_reason:
        tags["cascade.forced_reason"] = forced_reason
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:TAG_LIMIT])


def promote(name: str, version: str | int, gates: GatesConfig, force: bool = False,
            reason: str | None = None) -> Decision:
    """`cascade promote`: the register stage's gates applied to an existing version by hand."""
    from mlflow.exceptions import MlflowException

    from components.tracking import _mlflow

    if force and not (reason or "").strip():
        raise StageError("--force needs --reason: say why the gates are overridden (it is recorded)")
    client = _mlflow().MlflowClient()
    try:
        candidate = client.get_model_version(name, str(version))
    except MlflowException:
        raise StageError(f"registered model {name!r} has no version {version!r}") from None
    champion = champion_metrics(client, name)
    if champion is not None and champion[0] == str(candidate.version):
        raise StageError(f"{name} version {candidate.version} already is the champion")
    decision = decide(metrics_from_tags(candidate.tags), champion[1] if champion else None, gates,
                      failure=candidate.tags.get(FAILURE_TAG))
    if force:
        decision = Decision(True, CHAMPION, [*decision.reasons, f"forced: {reason.strip()}"])
    apply_decision(client, name, candidate.version, decision, forced_reason=reason.strip() if force else None)
    return decision
