"""Stage `register` on the smoke cascade: a real pyfunc in a private registry, loaded and served."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from components import register, tracking
from components.registry import FAILURE_TAG
from tests.conftest import free_port

METRICS = {"fid": 80.0, "clip_score": 0.25, "checker_single": 0.3, "checker_pair": 0.1, "fid.guidance_4": 95.0}
CHAMPION_URI = "models:/cascade-smoke@champion"


def evaluation(directory: Path, metrics: dict | None, failure: str | None = None) -> Path:
    """An evaluate stage output: metrics.json (NaN written as JSON's NaN) and optionally failed.json."""
    directory.mkdir(parents=True)
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics))
    if failure:
        (directory / "failed.json").write_text(json.dumps({"reason": failure}))
    return directory


def register_run(smoke_cascade, root: Path, metrics: dict | None, failure: str | None = None):
    s = smoke_cascade
    return register.run(s.art.cfg, s.art.tokenizer, s.base, s.superres, None,
                        evaluation(root / "evaluate", metrics, failure), root / "register",
                        data_digest="sha256:data", pipeline_run_id="pipeline-run")


def png(encoded: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.format == "PNG"
    return image


def test_read_evaluation_reports_every_unusable_evaluation(tmp_path):
    ok = evaluation(tmp_path / "ok", METRICS | {"note": "text", "flag": True})
    assert register.read_evaluation(ok) == (METRICS, None)
    assert "metrics.json: missing" in register.read_evaluation(evaluation(tmp_path / "none", None))[1]
    bad = evaluation(tmp_path / "bad", None)
    (bad / "metrics.json").write_text("{")
    assert "not valid JSON" in register.read_evaluation(bad)[1]
    assert register.read_evaluation(evaluation(tmp_path / "failed", METRICS, "OOM"))[1] == "OOM"


class RecordingCascade:
    """Stands in for models.cascade.Cascade: records each batch, paints image i grey level 20 * seed_i."""

    def __init__(self):
        self.batches = []

    def encode_text(self, prompts):
        return torch.zeros(len(prompts), 1, 1), torch.ones(len(prompts), 1, dtype=torch.bool)

    def generate_from_text(self, text, mask, seeds, guidance=None, steps=None):
        self.batches.append((list(seeds), guidance, steps))
        return torch.stack([torch.full((3, 2, 2), s * 20 / 127.5 - 1) for s in seeds])


def test_serving_batches_rows_with_equal_settings_and_keeps_their_order(monkeypatch):
    from components import serving

    model = serving.CascadeModel()
    model.cascade = RecordingCascade()
    rows = pd.DataFrame({"prompt": list("abcde"), "seed": [5, None, 7, 8, 9], "guidance": [None, 0.5, None, None, 0.5],
                         "steps": [None, None, None, 2, None]})
    monkeypatch.setattr(serving, "MAX_BATCH", 1 + 1)
    out = model.predict(None, rows)
    assert out["prompt"].tolist() == list("abcde") and out["seed"].tolist() == [5, 1, 7, 8, 9]  # default: position
    assert model.cascade.batches == [([5, 7], None, None), ([1, 9], 0.5, None), ([8], None, 2)]
    assert [png(i).getpixel((0, 0))[0] for i in out["image"]] == [20 * s for s in (5, 1, 7, 8, 9)]
    model.cascade.batches.clear()
    assert model.predict(None, ["x", "y", "z"])["seed"].tolist() == [0, 1, 2]  # a plain list of prompts
    assert model.cascade.batches == [([0, 1], None, None), ([2], None, None)]
    for bad, match in ((pd.DataFrame({"text": ["x"]}), "needs a `prompt` column"), (["x", ""], "row 1: prompt"),
                       (pd.DataFrame({"prompt": ["x"], "seed": ["one"]}), "seed 'one' is not a number")):
        with pytest.raises(MlflowException, match=match) as err:
            model.predict(None, bad)
        assert "\n" not in err.value.message


def test_register_makes_a_servable_champion_then_a_challenger(smoke_cascade, tmp_path, mlflow_uri):
    cfg = smoke_cascade.art.cfg
    s = smoke_cascade
    parent = tracking.start_pipeline_run(cfg.tracking.experiment, cfg.profile, launcher="test")
    metrics_file = tmp_path / "metrics" / "register.json"
    result = register.execute(cfg, s.art.tokenizer, s.base, s.superres, None,
                              evaluation(tmp_path / "evaluate", METRICS), tmp_path / "register", metrics_file,
                              "sha256:data", parent_run_id=parent)
    assert result.metrics == {"version": 1.0, "promoted": 1.0}
    assert json.loads(metrics_file.read_text()) == result.metrics
    record = json.loads((tmp_path / "register" / register.REGISTRATION_FILE).read_text())
    assert {k: record[k] for k in ("model_name", "version", "alias", "decision", "model_uri")} == {
        "model_name": "cascade-smoke", "version": "1", "alias": "champion", "decision": "promoted",
        "model_uri": "models:/cascade-smoke/1"}

    client = mlflow.MlflowClient()
    version = client.get_model_version("cascade-smoke", "1")
    assert version.aliases == ["champion"]
    tags = version.tags
    assert {k: float(tags[f"metric.{k}"]) for k in METRICS} == METRICS
    assert (tags["data_digest"], tags["git_commit"], tags["pipeline_run_id"], tags["profile"]) == (
        "sha256:data", tracking.git_commit(), parent, "smoke")
    stage_run = client.get_run(version.run_id)  # the model was logged in the stage's run, nested in the pipeline's
    assert stage_run.data.tags["cascade.stage"] == "register" and stage_run.data.tags["mlflow.parentRunId"] == parent
    assert register.REGISTRATION_FILE in [a.path for a in client.list_artifacts(version.run_id)]

    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    request = pd.DataFrame({"prompt": ["a red circle", "two blue squares", "a red circle"], "seed": [1, 2, 1]})
    out = model.predict(request)
    assert list(out.columns) == ["prompt", "seed", "image"] and out["seed"].tolist() == [1, 2, 1]
    side = cfg.tokenizer.superres.resolution
    assert all(png(i).size == (side, side) and png(i).mode == "RGB" for i in out["image"])
    assert out["image"][0] == out["image"][2]  # same prompt and seed, same image, whatever the batch
    assert model.predict(request)["image"].tolist() == out["image"].tolist()
    assert model.predict(pd.DataFrame({"prompt": ["a red circle"], "seed": [3]}))["image"][0] != out["image"][0]
    with pytest.raises(MlflowException, match="steps must be a positive integer"):  # overrides reach the sampler
        model.predict(pd.DataFrame({"prompt": ["a red circle"], "steps": [0]}))
    assert model.predict(pd.Series(["a red circle"], name="prompt"))["seed"].tolist() == [0]  # default: row position
    with pytest.raises(MlflowException, match="non-empty") as err:
        model.predict(pd.DataFrame({"prompt": [" "]}))
    assert "\n" not in err.value.message

    second = register_run(smoke_cascade, tmp_path / "second", METRICS)  # equal metrics: margin 0 is not beaten
    assert (second.version, second.decision.alias, second.metrics["promoted"]) == ("2", "challenger", 0.0)
    assert str(client.get_model_version_by_alias("cascade-smoke", "champion").version) == "1"
    tags = client.get_model_version("cascade-smoke", "2").tags
    assert tags["cascade.decision"] == "rejected" and "FAIL: checker_single" in tags["cascade.decision_reasons"]


def test_a_nan_or_failed_evaluation_registers_but_never_promotes(smoke_cascade, tmp_path, mlflow_uri):
    nan = register_run(smoke_cascade, tmp_path / "nan", METRICS | {"clip_score": math.nan})
    assert (nan.version, nan.decision.alias, nan.decision.promote) == ("1", "challenger", False)
    failed = register_run(smoke_cascade, tmp_path / "failed", METRICS, failure="evaluator ran out of memory")
    assert failed.decision.alias == "challenger"
    client = mlflow.MlflowClient()
    with pytest.raises(MlflowException):  # nothing ever became champion, even with no rival
        client.get_model_version_by_alias("cascade-smoke", "champion")
    assert client.get_model_version("cascade-smoke", "1").tags["metric.clip_score"] == "nan"
    tags = client.get_model_version("cascade-smoke", "2").tags
    assert tags[FAILURE_TAG] == "evaluator ran out of memory"
    assert "evaluation failed: evaluator ran out of memory" in tags["cascade.decision_reasons"]
    record = json.loads((tmp_path / "nan" / "register" / register.REGISTRATION_FILE).read_text())
    assert record["decision"] == "rejected" and any("clip_score is nan" in r for r in record["reasons"])


def test_mlflow_models_serve_answers_a_request(smoke_cascade, tmp_path, mlflow_uri):
    register_run(smoke_cascade, tmp_path, METRICS)
    port, log = free_port(), tmp_path / "serve.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    # the server runs `uvicorn` from PATH: this environment's, as with an activated virtualenv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    with open(log, "wb") as out:
        server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local",
                                   "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group, so its workers stop with it
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no /ping answer in 120 s: {log.read_text()[-3000:]}"
            try:
                if local.open(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        body = json.dumps({"dataframe_records": [{"prompt": "a red circle", "seed": 1}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        predictions = json.loads(local.open(request, timeout=60).read())["predictions"]
        assert [(p["prompt"], p["seed"]) for p in predictions] == [("a red circle", 1)]
        side = smoke_cascade.art.cfg.tokenizer.superres.resolution
        assert png(predictions[0]["image"]).size == (side, side)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
