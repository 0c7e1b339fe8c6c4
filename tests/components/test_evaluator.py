"""Stage `evaluator`: training on the smoke data, exports, validation metrics, resume, bad input."""

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from components import evaluator
from components.errors import BadInputError
from components.features import FeatureStore
from components.images import ShardImageDataset
from components.io import ACCEPTED_FILE
from models.evaluator import evaluator_digest, read_evaluator_meta

METRICS = {"retrieval_i2t_top1", "retrieval_t2i_top1", "retrieval_chance", "clip_score_matched",
           "clip_score_shuffled", "val_loss", "train_seconds", "parameters"}


@dataclass(frozen=True)
class Trained:
    cfg: object
    result: evaluator.EvaluatorResult
    out: Path
    ckpt: Path


def with_evaluator(cfg, **changes):
    """cfg with evaluator.train fields changed."""
    return replace(cfg, evaluator=replace(cfg.evaluator, train=replace(cfg.evaluator.train, **changes)))


@pytest.fixture(scope="module")
def trained(smoke_artifacts, tmp_path_factory) -> Trained:
    art = smoke_artifacts
    cfg = with_evaluator(art.cfg, steps=60)  # the smoke profile's 12 steps barely start; 60 take seconds
    root = tmp_path_factory.mktemp("evaluator")
    result = evaluator.run(cfg, art.data, art.validate, art.features, root / "out", root / "ckpt")
    return Trained(cfg, result, root / "out", root / "ckpt")


def test_exports_load_and_record_the_encoder_and_data_they_were_trained_on(smoke_artifacts, trained):
    art = smoke_artifacts
    model = evaluator.load_for_scoring(trained.out, art.features)
    ev = trained.cfg.evaluator
    assert (model.spec.resolution, model.spec.channels, model.spec.embed_dim) == (ev.resolution, tuple(ev.channels),
                                                                                 ev.embed_dim)
    meta = read_evaluator_meta(trained.out)
    assert meta["text_encoder_fingerprint"] == FeatureStore.open(art.features).fingerprint
    accepted = pd.read_parquet(art.validate / ACCEPTED_FILE)
    assert meta["train_items"] == (accepted["split"] == "train").sum() > 0
    assert meta["steps"] == 60 and len(meta["data_digest"]) == 64
    assert json.loads((trained.out / "metrics.json").read_text()) == pytest.approx(trained.result.metrics)
    assert METRICS <= set(trained.result.metrics)
    assert all(math.isfinite(v) for v in trained.result.metrics.values())
    assert not list(trained.out.glob("*.ckpt"))  # checkpoints stay out of the outputs


def test_the_trained_evaluator_aligns_val_images_with_their_captions(trained):
    m = trained.result.metrics
    assert m["retrieval_i2t_top1"] > 5 * m["retrieval_chance"]
    assert m["retrieval_t2i_top1"] > 5 * m["retrieval_chance"]
    assert m["clip_score_matched"] > m["clip_score_shuffled"] + 20
    assert m["val_loss"] < math.log(trained.cfg.evaluator.train.batch_size)  # below chance for a full batch


def test_the_reported_clip_score_is_what_the_exported_model_gives(smoke_artifacts, trained):
    art = smoke_artifacts
    model = evaluator.load_for_scoring(trained.out)
    accepted = pd.read_parquet(art.validate / ACCEPTED_FILE)
    val = accepted[accepted["split"] == "val"]
    images = torch.stack([x for x in ShardImageDataset(art.data, val, trained.cfg.evaluator.resolution)])  # [-1,1]
    text, mask = FeatureStore.open(art.features).lookup(val["key"].tolist())
    with torch.no_grad():
        score = model.clip_score((images + 1) / 2, text, mask).mean()
    assert float(score) == pytest.approx(trained.result.metrics["clip_score_matched"], abs=1e-3)


def test_a_rerun_resumes_the_finished_checkpoint_and_is_tracked(smoke_artifacts, trained, tmp_path, mlflow_uri):
    import mlflow

    art = smoke_artifacts
    result = evaluator.execute(trained.cfg, art.data, art.validate, art.features, tmp_path / "out", trained.ckpt,
                               tmp_path / "metrics.json")
    assert result.metrics["resumed_from_step"] == 60  # nothing left to train
    assert evaluator_digest(tmp_path / "out") == evaluator_digest(trained.out)
    assert json.loads((tmp_path / "metrics.json").read_text())["retrieval_i2t_top1"] == pytest.approx(
        trained.result.metrics["retrieval_i2t_top1"])
    run = mlflow.search_runs(experiment_names=[trained.cfg.tracking.experiment], output_format="list")[0]
    assert run.data.tags["cascade.stage"] == "evaluator"
    assert run.data.metrics["clip_score_matched"] == pytest.approx(result.metrics["clip_score_matched"])


def test_features_from_another_encoder_are_refused_for_scoring(smoke_artifacts, trained, tmp_path):
    other = tmp_path / "features"
    shutil.copytree(smoke_artifacts.features, other)
    encoder = json.loads((other / "encoder.json").read_text())
    (other / "encoder.json").write_text(json.dumps({**encoder, "fingerprint": "f" * 64}))
    with pytest.raises(BadInputError) as err:
        evaluator.load_for_scoring(trained.out, other)
    message = str(err.value)
    assert str(trained.out) in message and str(other) in message and "\n" not in message
    shutil.copytree(trained.out, tmp_path / "broken")
    (tmp_path / "broken" / "evaluator.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BadInputError, match="evaluator.safetensors: corrupt"):
        evaluator.load_for_scoring(tmp_path / "broken")


def test_bad_input_is_a_one_line_error_naming_the_file(smoke_artifacts, tmp_path):
    art = smoke_artifacts

    def fails(cfg=art.cfg, validate=art.validate, features=art.features) -> str:
        with pytest.raises(BadInputError) as err:
            evaluator.run(cfg, art.data, validate, features, tmp_path / "out", tmp_path / "ckpt")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert str(tmp_path / "none") in fails(features=tmp_path / "none")  # features stage not run
    big = replace(art.cfg, evaluator=replace(art.cfg.evaluator, resolution=art.cfg.data.builtin.image_size * 2))
    assert "smaller than evaluator.resolution" in fails(big) and ACCEPTED_FILE in fails(big)
    assert "exceeds the" in fails(with_evaluator(art.cfg, batch_size=10_000))

    # no train split: accepted manifest and feature items without the train rows
    validate, features = tmp_path / "validate", tmp_path / "features"
    shutil.copytree(art.features, features)
    validate.mkdir()
    accepted = pd.read_parquet(art.validate / ACCEPTED_FILE)
    accepted[accepted["split"] != "train"].to_parquet(validate / ACCEPTED_FILE)
    items = pd.read_parquet(features / "items.parquet")
    items[items["split"] != "train"].to_parquet(features / "items.parquet")
    message = fails(validate=validate, features=features)
    assert str(validate / ACCEPTED_FILE) in message and "train split" in message
    assert "different items" in fails(validate=validate)  # features computed for another accepted set
    assert not (tmp_path / "out").exists()
