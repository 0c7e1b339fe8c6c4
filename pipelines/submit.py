"""`cascade submit --host URL`: compile the pipeline for a profile and start a run with kfp.Client."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from components.errors import StageError


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    url: str
    arguments: dict[str, str]


def parse_arguments(pairs: list[str], allowed: set[str]) -> dict[str, str]:
    """KEY=VALUE pairs from the command line, checked against the pipeline's parameters."""
    arguments: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StageError(f"--param {pair!r}: expected KEY=VALUE")
        if key not in allowed:
            raise StageError(f"--param {key}: not a pipeline parameter (parameters: {', '.join(sorted(allowed))})")
        if key in ("params", "profile"):
            raise StageError(f"--param {key}: set it with the global --params/--profile options instead")
        arguments[key] = value
    return arguments


def submit(host: str, params_path: Path | None, profile: str | None, pairs: list[str], experiment: str,
           run_name: str | None, namespace: str | None, token: str | None,
           client_factory: Callable | None = None) -> SubmittedRun:
    """Compile for `profile` (placement is compile-time), then create a run under the params'
    service account; returns the run id and its UI address."""
    from components.config import load_config
    from pipelines.kfp_pipeline import compile_pipeline

    cfg = load_config(params_path, profile)
    with tempfile.TemporaryDirectory(prefix="cascade-submit-") as tmp:
        package = compile_pipeline(Path(tmp) / "cascade_pipeline.yaml", params_path=params_path, profile=cfg.profile)
        pipeline_spec = next(yaml.safe_load_all(package.read_text()))  # then the platform (Kubernetes) spec
        allowed = set(pipeline_spec["root"]["inputDefinitions"]["parameters"])
        arguments = {"profile": cfg.profile, **parse_arguments(pairs, allowed)}
        if client_factory is None:
            import kfp

            client_factory = kfp.Client
        namespace = namespace or cfg.kubeflow.namespace
        try:
            client = client_factory(host=host, namespace=namespace, existing_token=token)
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
                namespace=namespace, service_account=cfg.kubeflow.service_account)
        except StageError:
            raise
        except Exception as err:  # kfp raises urllib3 / ApiException / ValueError variants
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise StageError(f"could not submit to Kubeflow Pipelines at {host}: {first} "
                             "(is the API reachable, e.g. `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`?)") from None
    return SubmittedRun(result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}", arguments)
