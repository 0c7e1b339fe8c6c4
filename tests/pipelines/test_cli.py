"""`cascade` through typer's CliRunner: help, config, check, compile and one real stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from components.config import load_config
from models import shapes
from pipelines.cli import app
from tests.conftest import REPO

PARAMS = REPO / "params.yaml"
COMMANDS = ("stage", "repro", "ingest", "validate", "check", "config", "models", "generate", "compile", "submit", "run",
            "promote")


def invoke(*args) -> "object":
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_failure(result) -> str:
    """Exit 1, exactly one `error: ...` line on stderr, no traceback anywhere; returns that line."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- help ------------------------------------------------------------------------------------


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    listed = set()
    for line in result.stdout.splitlines():
        words = line.strip(" │|").split()
        if words and words[0] in COMMANDS:
            listed.add(words[0])
    assert listed == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.stdout and command in result.stdout.split("Usage:", 1)[1].splitlines()[0]
    assert "Traceback" not in result.output


def test_no_arguments_shows_help_not_a_traceback():
    result = invoke()
    assert "Usage:" in result.output and "Traceback" not in result.output


# --- config ----------------------------------------------------------------------------------


def test_config_prints_the_smoke_section_as_yaml():
    result = invoke("--params", PARAMS, "--profile", "smoke", "config", "data.builtin")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    smoke = load_config(PARAMS, "smoke").data.builtin
    assert printed == {
        "seed": smoke.seed, "image_size": 32, "n_train": 192, "n_val": 32, "n_test": 64,
        "max_objects": smoke.max_objects, "heldout_fraction": smoke.heldout_fraction,
        "image_format": smoke.image_format,
    }
    # the default profile (tiny) differs, so the profile really was applied
    tiny = yaml.safe_load(invoke("--params", PARAMS, "config", "data.builtin").stdout)
    assert tiny["n_train"] == load_config(PARAMS).data.builtin.n_train != 192


def test_config_whole_tree_names_the_profile():
    result = invoke("--params", PARAMS, "--profile", "smoke", "config")
    assert result.exit_code == 0, result.output
    tree = yaml.safe_load(result.stdout)
    assert tree["profile"] == "smoke" and tree["features"]["batch_size"] == 64
    assert set(tree) >= {"data", "validate", "features", "tracking"}


def test_bad_profile_is_one_line_error():
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "huge", "config"))
    assert "huge" in line and "smoke" in line


def test_unknown_config_section_is_one_line_error():
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "config", "data.nope"))
    assert "data.nope" in line


def test_missing_params_file_is_one_line_error(tmp_path: Path):
    line = assert_clean_failure(invoke("--params", tmp_path / "absent.yaml", "config"))
    assert "absent.yaml" in line


# --- check -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str, str]:
    """(PNG of a generated scene, its caption, a caption it does not match)."""
    scene = next(
        s for _, _, s in shapes.generate(seed=0, n_train=8, n_val=0, n_test=0, image_size=64,
                                         max_objects=3, heldout_fraction=0.2)
        if s.relation is not None
    )
    path = tmp_path_factory.mktemp("check") / "scene.png"
    shapes.render(scene, 64).save(path)
    good = shapes.caption(scene)
    colours = [c for c in shapes.COLOURS if c not in {g.colour for g in scene.groups}]
    first = scene.groups[0]
    wrong_group = shapes.ShapeGroup(colours[0], first.shape, first.size, first.count)
    wrong = shapes.caption(shapes.Scene((wrong_group, *scene.groups[1:]), scene.relation))
    assert wrong != good
    return path, good, wrong


def test_check_accepts_the_scene_caption(rendered):
    path, good, _ = rendered
    result = invoke("check", path, good)
    assert result.exit_code == 0, result.output
    assert "colour: True" in result.stdout and "False" not in result.stdout


def test_check_rejects_a_wrong_caption(rendered):
    path, _, wrong = rendered
    result = invoke("check", path, wrong)
    assert result.exit_code == 1, result.output
    assert "colour: False" in result.stdout
    assert result.stderr == "" and "Traceback" not in result.output


def test_check_ungrammatical_caption_is_a_clear_error(rendered):
    path, _, _ = rendered
    line = assert_clean_failure(invoke("check", path, "a sort of reddish blob thing"))
    assert "expected" in line and "colour in" in line  # quotes the grammar


def test_check_missing_image_is_one_line_error(tmp_path: Path):
    line = assert_clean_failure(invoke("check", tmp_path / "nope.png", "a small red circle"))
    assert "nope.png" in line


@pytest.mark.parametrize("content", [b"", b"plain text, not a picture\n"], ids=["empty", "text"])
def test_check_file_that_is_not_an_image_is_one_line_error(tmp_path: Path, content: bytes):
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    line = assert_clean_failure(invoke("check", path, "a small red circle"))
    assert "fake.png" in line


# --- compile ---------------------------------------------------------------------------------


def test_compile_writes_the_pipeline_yaml(tmp_path: Path):
    out = tmp_path / "sub" / "x.yaml"
    result = invoke("--params", PARAMS, "compile", "-o", out)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    spec, platform = yaml.safe_load_all(out.read_text())  # the pipeline, then its Kubernetes placement
    components = set(spec["components"])
    for stage in ("data", "validate", "features"):
        assert f"comp-{stage}" in components, components
    tasks = set(spec["root"]["dag"]["tasks"])
    assert tasks  # the DAG has tasks (the three stages run inside the exit handler's sub-DAG)
    assert "nodeSelector" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-data"]

    smoke = tmp_path / "smoke.yaml"
    assert invoke("--params", PARAMS, "--profile", "smoke", "compile", "-o", smoke).exit_code == 0
    images = {e["container"]["image"] for e in next(yaml.safe_load_all(smoke.read_text()))["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/cascade-t2i/cascade:0.1.0"}  # --profile picks smoke's all-CPU placement
    assert "params" in spec["root"]["inputDefinitions"]["parameters"]


# --- a real stage --------------------------------------------------------------------------


def test_stage_data_writes_manifest_and_metrics(tmp_path: Path, monkeypatch, mlflow_uri):
    params = yaml.safe_load(PARAMS.read_text())
    params["profile"] = "smoke"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)

    result = invoke("stage", "data")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("data: ")

    manifest = pq.read_table(tmp_path / "artifacts" / "data" / "manifest.parquet").to_pandas()
    smoke = load_config(tmp_path / "params.yaml").data.builtin
    assert len(manifest) == smoke.n_train + smoke.n_val + smoke.n_test
    assert manifest["split"].value_counts().to_dict() == {"train": 192, "test": 64, "val": 32}
    metrics = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert metrics["n_items"] == len(manifest)
    assert all((tmp_path / "artifacts" / "data" / s).is_file() for s in manifest["shard"].unique())
    assert (tmp_path / "mlflow.db").is_file()  # tracked in the test's private store, not the repo's


def test_stage_unknown_name_is_one_line_error(tmp_path: Path, monkeypatch, mlflow_uri):
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    line = assert_clean_failure(invoke("stage", "nonsense"))
    assert "nonsense" in line and "data" in line


def test_run_without_local_is_one_line_error():
    line = assert_clean_failure(invoke("--params", PARAMS, "run"))
    assert "--local" in line


def test_models_reports_parameter_counts_for_the_production_profile():
    result = invoke("--params", PARAMS, "--profile", "base256", "models")
    assert result.exit_code == 0, result.output
    assert "profile base256" in result.stdout
    assert "text encoder (minilm, frozen): 22.7M parameters" in result.stdout
    assert "base generator (masked transformer, 24 layers x 1024, 256 tokens)" in result.stdout
    assert "superres generator (masked transformer, 16 layers x 768, 1024 tokens)" in result.stdout


def test_repro_refuses_a_profile_dvc_cannot_see():
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "base256", "repro"))
    assert "dvc repro uses params.yaml's `profile:" in line and "dvc exp run -S profile=base256" in line


# --- generate --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_artifacts(smoke_cascade, tmp_path_factory) -> Path:
    """The smoke cascade laid out as the DVC pipeline leaves it (artifacts/<stage>)."""
    root = tmp_path_factory.mktemp("artifacts")
    for name, path in (("base", smoke_cascade.base), ("superres", smoke_cascade.superres),
                       ("tokenizer", smoke_cascade.art.tokenizer)):
        shutil.copytree(path, root / name)
    return root


def test_generate_writes_a_png_at_the_superres_resolution_deterministically(trained_artifacts, tmp_path):
    from PIL import Image

    args = ("--params", PARAMS, "--profile", "smoke", "generate", "two small red circles above a blue square",
            "--artifacts", trained_artifacts, "--seed", 3, "--guidance", 2.0, "--steps", 3)
    first = invoke(*args, "-o", tmp_path / "a.png")
    assert first.exit_code == 0, first.output
    second = invoke(*args, "-o", tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        side = load_config(PARAMS, "smoke").tokenizer.superres.resolution
        assert im.size == (side, side) and im.mode == "RGB"
    other = invoke(*args[:-4], "--seed", 4, "--negative-prompt", "a red circle", "-o", tmp_path / "c.png")
    assert other.exit_code == 0, other.output and second.exit_code == 0


def test_generate_batches_prompts_and_images_per_prompt(trained_artifacts, tmp_path):
    result = invoke("--params", PARAMS, "--profile", "smoke", "generate", "a red circle", "two blue squares",
                    "--batch", 2, "--artifacts", trained_artifacts, "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out-{i}.png" for i in range(4)]
    assert "out-2.png: two blue squares" in result.stdout


def test_generate_inpaints_inside_a_mask(trained_artifacts, tmp_path):
    import numpy as np
    from PIL import Image

    side = load_config(PARAMS, "smoke").tokenizer.superres.resolution
    Image.fromarray(np.full((side, side, 3), 255, np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((side, side, 3), np.uint8)
    mask[: side // 2] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = invoke("--params", PARAMS, "--profile", "smoke", "generate", "a red circle", "--artifacts",
                    trained_artifacts, "--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
                    "-o", tmp_path / "edit.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "edit.png").exists()


@pytest.mark.parametrize("extra, message", [
    (("--batch", "0"), "--batch must be >= 1"),
    (("--steps", "0"), "sampler steps must be a positive integer"),
    (("--init-image", "x.png"), "needs both --init-image and --mask"),
])
def test_generate_bad_options_are_one_line_errors(trained_artifacts, extra, message):
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "generate", "a red circle",
                                       "--artifacts", trained_artifacts, *extra))
    assert message in line


def test_generate_without_a_trained_cascade_says_what_to_run(tmp_path):
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "generate", "a red circle",
                                       "--artifacts", tmp_path))
    assert "train the cascade first (cascade repro)" in line
