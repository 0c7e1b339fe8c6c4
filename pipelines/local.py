"""`cascade run --local`: the real KFP DAG on this machine through kfp.local's SubprocessRunner."""

from __future__ import annotations

import warnings
from pathlib import Path

from components.errors import StageError


def run_local(pipeline_root: str | Path, profile: str, params_path: str | Path | None = None,
              data_source: str = "", arguments: dict[str, str] | None = None) -> dict[str, Path]:
    """Run the pipeline locally; returns {"task/output": path} for the artifacts of this run.
    `arguments` sets other pipeline parameters (model_name, the gates), as the Kubeflow UI would."""
    from kfp import local

    from pipelines.kfp_pipeline import build_pipeline, params_default

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    # use_venv=False: tasks run with this interpreter and its installed packages, as the image does.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = build_pipeline(params_default(params_path), cluster=False)
    with warnings.catch_warnings():
        # kfp warns that our base image name has no "python" in it; locally the image is not used.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            pipeline(profile=profile, data_source=data_source, **(arguments or {}))
        except RuntimeError as err:
            raise StageError(f"local pipeline run failed: {str(err).splitlines()[0]} (task logs above)") from None
    new_runs = sorted(set(pipeline_root.iterdir()) - before)
    if not new_runs:
        raise StageError(f"local pipeline run wrote nothing under {pipeline_root}")
    run_dir = new_runs[-1]
    return {
        f"{task.name}/{out.name}": out
        for task in sorted(run_dir.iterdir()) if task.is_dir()
        for out in sorted(task.iterdir()) if out.name != "executor_output.json"
    }
