"""The KFP task bodies (pipelines/kfp_tasks.py) for the diffusion family, called with stand-in
artifacts: each PixArt phase task trains its phase from the previous task's weights."""

import json
from pathlib import Path

import torch
import yaml

from pipelines.kfp_tasks import base_task, superres_task


class Artifact:
    """What a KFP Input/Output artifact offers the task bodies: a path, metadata, log_metric."""

    def __init__(self, path: Path):
        self.path, self.metadata, self.logged = str(path), {}, {}
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    def log_metric(self, name: str, value: float) -> None:
        self.logged[name] = value


def test_phase_tasks_chain_their_weights_and_super_res_reads_the_images(smoke_diffusion, tmp_path, mlflow_uri,
                                                                        monkeypatch):
    from models.diffusion import load_diffusion, read_diffusion_meta

    monkeypatch.setenv("CASCADE_CHECKPOINT_DIR", str(tmp_path / "claim"))
    d, art = smoke_diffusion, smoke_diffusion.art
    tree = yaml.safe_load(Path("params.yaml").read_text())
    tree["generator"]["family"], tree["tokenizer"]["kind"] = "diffusion", "kl"
    params = json.dumps(tree)
    common = dict(validated=Artifact(art.validate), text_features=Artifact(art.features),
                  tokenizers=Artifact(d.tokenizer), image_tokens=Artifact(d.tokens))
    previous = None
    for phase in ("pixel", "align", "finetune"):
        out, samples, metrics = (Artifact(tmp_path / phase / name) for name in ("model", "samples.md", "metrics"))
        base_task(params, "smoke", "run0", base_model=out, samples=samples, metrics=metrics, phase=phase,
                  init_model=previous, **common)
        assert read_diffusion_meta(out.path)["phase"] == phase and out.metadata["phase"] == phase
        assert f"{phase}.final_loss" in metrics.logged
        if previous is not None:  # checkpoints per pipeline run and phase on the claim
            assert (tmp_path / "claim" / "run0" / "base" / phase / "last.ckpt").is_file()
        previous = out
    assert "checker_single_colour_shape" in metrics.logged  # the finished base model is checked
    assert not torch.equal(load_diffusion(tmp_path / "pixel" / "model").state_dict()["net.proj_out.weight"],
                           load_diffusion(tmp_path / "finetune" / "model").state_dict()["net.proj_out.weight"])

    sr, samples, metrics = (Artifact(tmp_path / "sr" / name) for name in ("model", "samples.md", "metrics"))
    superres_task(params, "smoke", "run0", dataset=Artifact(art.data), base_model=previous, superres_model=sr,
                  samples=samples, metrics=metrics, **common)
    assert read_diffusion_meta(sr.path)["spec"]["low_res"] > 0 and "final_loss" in metrics.logged
    assert "Exact checker" in Path(samples.path).read_text()
