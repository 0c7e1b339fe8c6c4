"""`dvc repro` of the pipeline (via `cascade repro`) in a scratch copy of the repo, smoke profile."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from components.io import sha256_file
from components.stage import STAGES
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _sh(args, cwd, env, check=True):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture
def project(tmp_path, mlflow_uri):
    """A git + DVC repo holding the pipeline definition and the code its stages depend on."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("components", "models", "pipelines"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("profile: tiny", "profile: smoke", 1))
    # .venv/bin deliberately not on PATH: `cascade repro` must find its own `cascade` for dvc.yaml
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": mlflow_uri}
    _sh(["git", "init", "-q"], root, env)
    _sh([str(BIN / "dvc"), "init", "-q"], root, env)
    _sh([str(BIN / "dvc"), "config", "core.analytics", "false"], root, env)
    _sh([str(BIN / "dvc"), "remote", "add", "-d", "local", str(tmp_path / "remote")], root, env)
    return root, env


def _outputs(root: Path) -> dict[str, str]:
    files = (p for p in sorted((root / "artifacts").rglob("*")) if p.is_file() and p.name != ".gitignore")
    return {str(p.relative_to(root)): sha256_file(p) for p in files}


@pytest.mark.slow
def test_repro_runs_every_stage_skips_unchanged_reruns_downstream_and_round_trips_the_remote(project):
    root, env = project
    first = _sh([str(BIN / "cascade"), "repro"], root, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
        assert (root / "metrics" / f"{stage}.json").is_file()
    assert (root / "artifacts/validate/accepted.parquet").is_file()
    assert (root / "dvc.lock").is_file()
    # the FID-vs-CLIP curve is a DVC plot
    plots = _sh([str(BIN / "dvc"), "plots", "show", "--json"], root, env)
    assert "plots/evaluate.csv" in plots.stdout and "clip_score" in plots.stdout
    assert "cascade generate" in first.stdout and "mlflow ui" in first.stdout  # where to go next

    # one parent run with a nested run per stage
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cascade").experiment_id])
    parents = [r for r in runs if r.data.tags.get("cascade.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = {r.data.tags["cascade.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert nested == set(STAGES)

    second = _sh([str(BIN / "cascade"), "repro"], root, env)
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout or "up to date" in second.stdout

    # editing another profile's overlay (here base256's cluster placement) re-runs nothing
    params = root / "params.yaml"
    text = params.read_text()
    base256_overlay = text.index("  base256:\n")
    edited = text[:base256_overlay] + text[base256_overlay:].replace('memory: 1000Gi', 'memory: 900Gi', 1)
    assert edited != text
    params.write_text(edited)
    status = _sh([str(BIN / "dvc"), "status"], root, env)
    assert "up to date" in status.stdout, status.stdout

    before = _outputs(root)
    _sh([str(BIN / "dvc"), "push"], root, env)
    shutil.rmtree(root / "artifacts")
    shutil.rmtree(root / ".dvc" / "cache")
    _sh([str(BIN / "dvc"), "pull"], root, env)
    assert _outputs(root) == before

    # a validate param change re-runs validate, never data; the accepted set is unchanged (no
    # smoke caption is that long), so features, which depends only on accepted.parquet, is skipped
    params.write_text(params.read_text().replace("caption_max_chars: 512", "caption_max_chars: 500"))
    third = _sh([str(BIN / "cascade"), "repro"], root, env)
    assert "Running stage 'data'" not in third.stdout
    assert "Running stage 'validate'" in third.stdout
    assert "Running stage 'features'" not in third.stdout


def test_repro_failure_is_one_line_and_marks_the_pipeline_run_failed(project):
    root, env = project
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("source: builtin", f"source: {root / 'missing'}", 1))
    out = _sh([str(BIN / "cascade"), "repro"], root, env, check=False)
    assert out.returncode == 1
    assert "error: dvc repro failed" in out.stderr
    assert "no .tar shards, metadata.jsonl, or .parquet/.csv manifest" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cascade").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cascade.kind") == "pipeline")
    assert parent.info.status == "FAILED"


# Code that several stages share and that shapes their outputs: each of those stages must depend on it,
# or `dvc repro` would keep outputs made by the old code.
SHARED_CODE = {
    # the checker computes these stages' metrics
    "models/checker.py": ("tokenizer", "base", "superres", "evaluate"),
    # fit, the LR schedule, precision: it also keys every training checkpoint (code_digest)
    "components/training.py": ("evaluator", "tokenizer", "base", "superres", "decoder_ft"),
}


@pytest.mark.parametrize("module", sorted(SHARED_CODE))
def test_stages_rerun_when_shared_code_they_use_changes(module):
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = [name for name in SHARED_CODE[module] if module not in stages[name]["deps"]]
    assert not missing, f"stages that use {module} but do not depend on it: {missing}"
