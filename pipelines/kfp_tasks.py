"""Bodies of the KFP components: map KFP artifact paths onto the stages' `execute()`.

Kept out of kfp_pipeline.py so the component functions stay one import and one call (KFP ships
their source text into the pod) and so this code is testable without KFP.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from components.errors import StageError


def _config(params: str, profile: str, overrides: dict | None = None):
    from components.config import load_config

    return load_config(profile=profile or None, overrides=overrides, text=params)


def _log_metrics(metrics_artifact, metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        metrics_artifact.log_metric(name, float(value))


def _metrics_file(metrics_artifact) -> Path:
    # The stage's metrics file goes next to the task's Metrics artifact, inside the task's outputs.
    return Path(metrics_artifact.path).parent / "stage_metrics.json"


def start_pipeline_task(params: str, profile: str, pipeline_job_id: str) -> str:
    from components import tracking

    cfg = _config(params, profile)
    return tracking.start_pipeline_run(cfg.tracking.experiment, cfg.profile, launcher="kfp",
                                       tags={tracking.JOB_ID_TAG: pipeline_job_id})


def finish_pipeline_task(params: str, profile: str, pipeline_job_id: str, state: str, error_message: str | None) -> None:
    from components import tracking

    cfg = _config(params, profile)
    run_id = tracking.find_pipeline_run(cfg.tracking.experiment, pipeline_job_id)
    if run_id is None:  # the start task itself failed: record the failure in a run of its own
        run_id = tracking.start_pipeline_run(cfg.tracking.experiment, cfg.profile, launcher="kfp",
                                             tags={tracking.JOB_ID_TAG: pipeline_job_id})
    ok = state == "SUCCEEDED"
    tracking.finish_pipeline_run(run_id, ok, None if ok else (error_message or f"pipeline {state}"))


def data_task(params, profile, data_source, parent_run_id, dataset, metrics) -> None:
    from components import data

    cfg = _config(params, profile, {"data.source": data_source} if data_source else None)
    result = data.execute(cfg, Path(dataset.path), _metrics_file(metrics), parent_run_id)
    dataset.metadata.update({"n_items": result.n_items, "kind": result.kind, "manifest_digest": result.manifest_digest})
    _log_metrics(metrics, result.metrics)


def validate_task(params, profile, parent_run_id, dataset, validated, report, metrics) -> None:
    from components import validate

    cfg = _config(params, profile)
    result = validate.execute(cfg, Path(dataset.path), Path(validated.path), _metrics_file(metrics), parent_run_id)
    validated.metadata.update({"n_accepted": result.n_accepted, "n_quarantined": result.n_quarantined,
                               "data_uri": dataset.uri})
    Path(report.path).write_text(validation_report_html(Path(validated.path)))
    _log_metrics(metrics, result.metrics)


def features_task(params, profile, parent_run_id, validated, text_features, metrics) -> None:
    from components import features

    cfg = _config(params, profile)
    result = features.execute(cfg, Path(validated.path), Path(text_features.path), _metrics_file(metrics), parent_run_id)
    text_features.metadata.update({"fingerprint": result.fingerprint, "dim": result.dim})
    _log_metrics(metrics, result.metrics)


def _checkpoint_root(stage: str, parent_run_id: str) -> Path:
    """On a cluster the pipeline mounts the checkpoint claim at $CASCADE_CHECKPOINT_DIR: one folder
    per pipeline run and stage, so a retried task resumes; elsewhere a scratch folder will do."""
    from components.stage import CHECKPOINT_DIR_ENV

    root = os.environ.get(CHECKPOINT_DIR_ENV)
    if root:
        return Path(root) / (parent_run_id or "no-parent-run") / stage
    return Path(tempfile.mkdtemp(prefix="cascade-ckpt-")) / stage


def _on_trainjob(cfg, params: str, stage: str, parent_run_id: str, inputs: dict, output, metrics,
                 phase: str | None = None):
    """None when the stage runs in this pod; with `nodes > 1` it runs as a Kubeflow TrainJob and
    this returns that job's result."""
    if getattr(cfg.kubeflow.stages, stage).nodes == 1:
        return None
    from pipelines.trainjob import run_remote_stage

    return SimpleNamespace(metrics=run_remote_stage(cfg, params, stage, parent_run_id,
                                                    {k: Path(v.path) for k, v in inputs.items()},
                                                    Path(output.path), _metrics_file(metrics), phase=phase))


def tokenizer_task(params, profile, parent_run_id, dataset, validated, tokenizers, metrics) -> None:
    from components import tokenizer

    cfg = _config(params, profile)
    result = _on_trainjob(cfg, params, "tokenizer", parent_run_id, {"data": dataset, "validate": validated},
                          tokenizers, metrics) or \
        tokenizer.execute(cfg, Path(dataset.path), Path(validated.path), Path(tokenizers.path),
                          _checkpoint_root("tokenizer", parent_run_id), _metrics_file(metrics), parent_run_id)
    tokenizers.metadata.update({"kind": cfg.tokenizer.kind, **{k: v for k, v in result.metrics.items() if "psnr" in k}})
    _log_metrics(metrics, result.metrics)


def tokens_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, image_tokens, metrics) -> None:
    from components import tokens

    cfg = _config(params, profile)
    result = tokens.execute(cfg, Path(dataset.path), Path(validated.path), Path(tokenizers.path),
                            Path(image_tokens.path), _metrics_file(metrics), Path(text_features.path), parent_run_id)
    image_tokens.metadata.update({"n_items": result.n_items})
    _log_metrics(metrics, result.metrics)


def base_task(params, profile, parent_run_id, validated, text_features, tokenizers, image_tokens, base_model,
              samples, metrics, phase: str | None = None, init_model=None) -> None:
    """The base stage, or (diffusion family) one PixArt phase started from init_model's weights."""
    from components import base
    from pipelines.trainjob import INIT_INPUT

    cfg = _config(params, profile)
    inputs = {"tokens": image_tokens, "features": text_features, "tokenizer": tokenizers, "validate": validated}
    if init_model is not None:
        inputs[INIT_INPUT] = init_model
    result = _on_trainjob(cfg, params, "base", parent_run_id, inputs, base_model, metrics, phase=phase) or \
        base.execute(cfg, Path(image_tokens.path), Path(text_features.path), Path(tokenizers.path),
                     Path(validated.path), Path(base_model.path), _checkpoint_root("base", parent_run_id),
                     _metrics_file(metrics), parent_run_id, phase=phase,
                     init_dir=Path(init_model.path) if init_model is not None else None)
    if phase:
        base_model.metadata.update({"phase": phase})
    _describe_generator(base_model, samples, result)
    _log_metrics(metrics, result.metrics)


def superres_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, image_tokens,
                  base_model, superres_model, samples, metrics) -> None:
    from components import superres

    cfg = _config(params, profile)
    inputs = {"tokens": image_tokens, "features": text_features, "tokenizer": tokenizers, "validate": validated,
              "base": base_model, "data": dataset}
    result = _on_trainjob(cfg, params, "superres", parent_run_id, inputs, superres_model, metrics) or \
        superres.execute(cfg, Path(image_tokens.path), Path(text_features.path), Path(tokenizers.path),
                         Path(validated.path), Path(base_model.path), Path(superres_model.path),
                         _checkpoint_root("superres", parent_run_id), _metrics_file(metrics), parent_run_id,
                         data_dir=Path(dataset.path))
    _describe_generator(superres_model, samples, result)
    _log_metrics(metrics, result.metrics)


def evaluator_task(params, profile, parent_run_id, dataset, validated, text_features, evaluator_model,
                   metrics) -> None:
    from components import evaluator

    cfg = _config(params, profile)
    inputs = {"data": dataset, "validate": validated, "features": text_features}
    result = _on_trainjob(cfg, params, "evaluator", parent_run_id, inputs, evaluator_model, metrics) or \
        evaluator.execute(cfg, Path(dataset.path), Path(validated.path), Path(text_features.path),
                          Path(evaluator_model.path), _checkpoint_root("evaluator", parent_run_id),
                          _metrics_file(metrics), parent_run_id)
    evaluator_model.metadata.update({k: v for k, v in result.metrics.items() if k.startswith("retrieval")})
    _log_metrics(metrics, result.metrics)


def decoder_ft_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, image_tokens,
                    base_model, superres_model, evaluator_model, decoder, report, metrics) -> None:
    from components import decoder_ft
    from components.scoring import fid_features

    cfg = _config(params, profile)
    inputs = {"data": dataset, "validate": validated, "tokens": image_tokens, "tokenizer": tokenizers,
              "base": base_model, "superres": superres_model, "evaluator": evaluator_model, "features": text_features}
    result = _on_trainjob(cfg, params, "decoder_ft", parent_run_id, inputs, decoder, metrics) or \
        decoder_ft.execute(cfg, Path(dataset.path), Path(validated.path), Path(image_tokens.path),
                           Path(tokenizers.path), Path(base_model.path), Path(superres_model.path),
                           Path(decoder.path), _checkpoint_root("decoder_ft", parent_run_id), _metrics_file(metrics),
                           parent_run_id, feature_module=fid_features(cfg.evaluate, Path(evaluator_model.path),
                                                                      Path(text_features.path)))
    decoder.metadata.update({k: v for k, v in result.metrics.items() if k.startswith(("psnr", "fid"))})
    page = Path(decoder.path) / "report.md"
    Path(report.path).write_text(page.read_text() if page.is_file() else "No decoder report.\n")
    _log_metrics(metrics, result.metrics)


def evaluate_task(params, profile, parent_run_id, dataset, validated, text_features, tokenizers, base_model,
                  superres_model, decoder, evaluator_model, evaluation, report, summary, metrics) -> None:
    from components import evaluate

    cfg = _config(params, profile)
    result = evaluate.execute(cfg, Path(dataset.path), Path(validated.path), Path(text_features.path),
                              Path(tokenizers.path), Path(base_model.path), Path(superres_model.path),
                              Path(decoder.path), Path(evaluator_model.path), Path(evaluation.path),
                              _metrics_file(metrics), parent_run_id)
    evaluation.metadata.update({k: result.metrics[k] for k in ("fid", "clip_score", "checker_single", "checker_pair")
                                if k in result.metrics})
    Path(report.path).write_text((Path(evaluation.path) / "report.html").read_text())
    Path(summary.path).write_text((Path(evaluation.path) / "report.md").read_text())
    _log_metrics(metrics, result.metrics)


def gate_overrides(gates: dict[str, str] | None) -> dict:
    """The Kubeflow UI's gate parameters as config overrides: "" keeps the profile's value, "none"
    turns the checker gate off; anything else must be a number."""
    overrides = {}
    for name, text in (gates or {}).items():
        text = (text or "").strip()
        if not text:
            continue
        if text.lower() in ("none", "null", "off") and name == "min_checker_single":
            overrides[f"register.gates.{name}"] = None
            continue
        try:
            overrides[f"register.gates.{name}"] = float(text)
        except ValueError:
            raise StageError(f"pipeline parameter {name}={text!r}: expected a number"
                             + (' or "none"' if name == "min_checker_single" else "")
                             + ", or empty for the profile's value") from None
    return overrides


def register_task(params, profile, parent_run_id, model_name, validated, tokenizers, base_model, superres_model,
                  decoder, evaluation, registration, metrics, gates: dict[str, str] | None = None) -> None:
    from components import register
    from components.io import frame_digest, read_accepted

    overrides = gate_overrides(gates)
    if model_name:
        overrides["register.model_name"] = model_name
    cfg = _config(params, profile, overrides)
    out = Path(tempfile.mkdtemp(prefix="cascade-register-"))
    result = register.execute(cfg, Path(tokenizers.path), Path(base_model.path), Path(superres_model.path),
                              Path(decoder.path), Path(evaluation.path), out, _metrics_file(metrics),
                              frame_digest(read_accepted(Path(validated.path))), parent_run_id)
    record = json.loads((out / "registration.json").read_text())
    registration.metadata.update({k: record[k] for k in ("model_name", "version", "alias", "model_uri") if k in record})
    reasons = "".join(f"- {r}\n" for r in record.get("reasons", []))
    Path(registration.path).write_text(
        f"# Registered {record.get('model_name')} version {record.get('version')}\n\n"
        f"Alias: **{record.get('alias')}** ({record.get('decision')})\n\n{reasons}")
    _log_metrics(metrics, result.metrics)


def _describe_generator(model_artifact, samples, result) -> None:
    """Model metadata for the KFP UI and a Markdown page with the exact-checker table."""
    model_artifact.metadata.update({k: v for k, v in result.metrics.items()
                                    if k in ("parameters", "checker_overall", "checker_single_colour_shape",
                                             "checker_pair_overall")})
    table = Path(model_artifact.path) / "checker.md"
    body = table.read_text() if table.is_file() else "No exact-checker evaluation (user data or eval_prompts: 0).\n"
    Path(samples.path).write_text("# Exact checker on held-out prompts\n\n" + body)


def validation_report_html(validate_dir: Path) -> str:
    """A self-contained page for the KFP UI: pass/fail, counts, quarantine reasons."""
    summary = json.loads((validate_dir / "summary.json").read_text())
    reasons = summary.get("reason_counts", {})
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in sorted(reasons.items()))
    counts = "".join(
        f"<li>{html.escape(k)}: {html.escape(str(summary[k]))}</li>"
        for k in ("n_items", "n_accepted", "n_quarantined", "bad_fraction", "passed", "gx_success")
        if k in summary
    )
    return (
        "<html><head><meta charset='utf-8'><title>Cascade validation</title></head><body>"
        f"<h1>Validation</h1><ul>{counts}</ul>"
        f"<h2>Quarantine reasons</h2><table border='1'><tr><th>reason</th><th>items</th></tr>{rows}</table>"
        "<p>Great Expectations Data Docs are in the validated dataset artifact under data_docs/.</p>"
        "</body></html>"
    )
