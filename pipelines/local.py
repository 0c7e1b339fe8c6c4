"""`cascade run --local`: the real KFP DAG on this machine through kfp.local's SubprocessRunner."""

from __future__ import annotations

import warnings
from pathlib import Path

from components.errors import StageError


def run_local(pipeline_root: str | Path, profile: str, params_path: str | Path | None = None,
              data_source: str = "") -> dict[str, str]:
    """Run the pipeline locally; returns {task output name: local path} for the artifacts it wrote."""
    from kfp import local

    from pipelines.kfp_pipeline import DEFAULT_PARAMS, build_pipeline

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    # use_venv=False: tasks run with this interpreter and its installed packages, like the image does.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=False)
    pipeline = build_pipeline(Path(params_path or DEFAULT_PARAMS).read_text())
    with warnings.catch_warnings():
        # kfp warns that our base image name has no "python" in it; locally the image is not used.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        task = pipeline(profile=profile, data_source=data_source)
    outputs = {name: artifact.path for name, artifact in _artifacts(task).items()}
    if getattr(task, "state", None) not in (None, "SUCCEEDED") and not outputs:
        raise StageError(f"local pipeline run failed (state {task.state}); see the task logs above")
    return outputs


def _artifacts(task) -> dict:
    found = {}
    for name, value in (getattr(task, "outputs", None) or {}).items():
        if hasattr(value, "path"):
            found[name] = value
    return found
