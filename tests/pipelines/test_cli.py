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
COMMANDS = ("stage", "repro", "ingest", "validate", "check", "config", "models", "generate", "touch-up", "compile",
            "submit", "run", "promote")


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


# --- generate --candidates (rejection sampling) --------------------------------------------------


@pytest.fixture(scope="module")
def scored_artifacts(trained_artifacts, smoke_evaluator, smoke_cascade, tmp_path_factory) -> Path:
    """trained_artifacts plus the domain evaluator and the text features (the evaluator scorer's inputs)."""
    root = tmp_path_factory.mktemp("scored") / "artifacts"
    shutil.copytree(trained_artifacts, root)
    shutil.copytree(smoke_evaluator, root / "evaluator")
    shutil.copytree(smoke_cascade.art.features, root / "features")
    return root


def _params_with(tmp_path: Path, **inference) -> Path:
    """params.yaml with `inference:` keys replaced (candidates, scorer)."""
    tree = yaml.safe_load(PARAMS.read_text())
    for key, value in inference.items():
        tree["inference"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _scores(line: str) -> tuple[float, list[float]]:
    """(kept score, all candidates' scores) from a `path: prompt  (evaluator score S, best of N: a, b)` line."""
    import re

    match = re.search(r"evaluator score (-?[\d.]+), best of (\d+): ([-\d., ]+)\)", line)
    assert match, line
    scores = [float(x) for x in match.group(3).split(", ")]
    assert len(scores) == int(match.group(2))
    return float(match.group(1)), scores


def test_generate_with_candidates_keeps_the_best_scored_of_the_plain_images(scored_artifacts, tmp_path):
    import numpy as np
    from PIL import Image

    common = ("--params", PARAMS, "--profile", "smoke", "generate", "a small red circle", "--artifacts",
              scored_artifacts, "--seed", 3)
    # candidate j of the prompt uses seed 3 + j: the same images as --batch 3 without rejection
    plain = invoke(*common, "--batch", 3, "--candidates", 1, "-o", tmp_path / "plain.png")
    assert plain.exit_code == 0, plain.output
    assert "score" not in plain.stdout  # 1 = off: nothing scored
    best = invoke(*common, "--candidates", 3, "-o", tmp_path / "best.png")
    assert best.exit_code == 0, best.output
    kept, scores = _scores(best.stdout.strip().splitlines()[-1])
    assert kept == max(scores) and len(set(scores)) > 1
    chosen = np.asarray(Image.open(tmp_path / "best.png"), dtype=int)
    distances = [np.abs(chosen - np.asarray(Image.open(tmp_path / f"plain-{j}.png"), dtype=int)).max() for j in range(3)]
    assert int(np.argmin(distances)) == scores.index(max(scores))
    assert min(distances) <= 1  # the same tokens; batch composition may round a pixel differently
    again = invoke(*common, "--candidates", 3, "-o", tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "best.png").read_bytes() and again.stdout == \
        best.stdout.replace("best.png", "again.png")


def test_generate_takes_the_candidate_count_from_params(scored_artifacts, tmp_path):
    params = _params_with(tmp_path, candidates=2)
    result = invoke("--params", params, "--profile", "smoke", "generate", "a small red circle", "two blue squares",
                    "--artifacts", scored_artifacts, "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(len(_scores(line)[1]) == 2 for line in lines)
    assert lines[1].startswith(f"{tmp_path / 'out-1.png'}: two blue squares")


@pytest.mark.parametrize("extra, message", [
    (("--candidates", "0"), "--candidates must be >= 1"),
    (("--candidates", "2", "--init-image", "x.png", "--mask", "m.png"), "cannot be combined with --init-image"),
])
def test_generate_bad_candidate_options_are_one_line_errors(trained_artifacts, extra, message):
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "generate", "a red circle",
                                       "--artifacts", trained_artifacts, *extra))
    assert message in line


def test_generate_candidates_without_an_evaluator_or_preference_model_says_what_is_missing(trained_artifacts,
                                                                                           tmp_path):
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "generate", "a red circle",
                                       "--artifacts", trained_artifacts, "--candidates", 2))
    assert "evaluator" in line and "re-run the evaluator stage" in line
    params = _params_with(tmp_path, scorer={"kind": "pickscore", "path": str(tmp_path / "no-pickscore")})
    line = assert_clean_failure(invoke("--params", params, "--profile", "smoke", "generate", "a red circle",
                                       "--artifacts", trained_artifacts, "--candidates", 2))
    assert str(tmp_path / "no-pickscore") in line and "inference.scorer.path" in line


# --- touch-up --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    """A 32px PNG (the smoke cascade's resolution) of a red circle left of a blue square."""
    from models.shapes import Placement, Scene, ShapeGroup

    scene = Scene((ShapeGroup("red", "circle", "large", 1), ShapeGroup("blue", "square", "small", 1)), "left of",
                  (Placement(0, 0.28, 0.5, 0.17), Placement(1, 0.75, 0.5, 0.11)))
    path = tmp_path_factory.mktemp("touchup") / "scene.png"
    shapes.render(scene, 32).save(path)
    return path


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_touch_up_finds_the_region_with_the_checker_and_keeps_every_other_pixel(trained_artifacts, scene_png,
                                                                                 tmp_path):
    from models.checker import region_mask

    args = ("--params", PARAMS, "--profile", "smoke", "touch-up", scene_png, "--caption", "a red circle",
            "--artifacts", trained_artifacts, "--seed", 1, "--strength", 0.8)
    result = invoke(*args, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert "'a red circle' re-generated in" in result.stdout
    before, after = _pixels(scene_png), _pixels(tmp_path / "a.png")
    # the checker's objects, grown past their blurred fringe and the feather ramp
    feather = load_config(PARAMS, "smoke").inference.touchup.feather
    region = region_mask(before, "a red circle", grow=feather + 1)
    assert after.shape == before.shape and f"re-generated in {int(region.sum())} pixels" in result.stdout
    assert (after[~region] == before[~region]).all()  # bit-exact outside the circle
    assert (after[region] != before[region]).any()
    again = invoke(*args, "-o", tmp_path / "b.png")
    assert again.exit_code == 0 and (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_touch_up_with_a_mask_png_or_a_segmenter(trained_artifacts, scene_png, tmp_path):
    import numpy as np
    from PIL import Image

    before = _pixels(scene_png)
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[4:12, 20:28] = 255  # a patch of background above the square
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ("--params", PARAMS, "--profile", "smoke", "touch-up", scene_png, "--caption", "a small green circle",
              "--artifacts", trained_artifacts, "--strength", 1.0)
    result = invoke(*common, "--mask", tmp_path / "mask.png", "-o", tmp_path / "masked.png")
    assert result.exit_code == 0, result.output
    after, region = _pixels(tmp_path / "masked.png"), mask[..., 0] > 0
    assert (after[~region] == before[~region]).all() and "64 pixels" in result.stdout
    result = invoke(*common, "--segmenter", "tests.models.test_touchup:left_half", "-o", tmp_path / "seg.png")
    assert result.exit_code == 0, result.output
    assert (_pixels(tmp_path / "seg.png")[:, 16:] == before[:, 16:]).all()


def test_touch_up_bad_inputs_are_one_line_errors(trained_artifacts, scene_png, tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    cases = [
        ((tmp_path / "absent.png", "--caption", "a red circle"), "absent.png: cannot read the image"),
        ((tmp_path / "junk.png", "--caption", "a red circle"), "junk.png: cannot read the image"),
        ((scene_png, "--caption", "a green triangle"), "no green triangle found in the image"),
        ((scene_png, "--caption", "a red circle above a blue square"), "more than one kind of object"),
        ((scene_png, "--caption", "x", "--mask", tmp_path / "empty.png"), "the region is empty"),
        ((scene_png, "--caption", "x", "--mask", tmp_path / "small.png"), "the mask is 16x16, the image 32x32"),
        ((scene_png, "--caption", "x", "--mask", tmp_path / "empty.png", "--segmenter", "a:b"), "either --mask or"),
        ((scene_png, "--caption", "x", "--segmenter", "tests.models.test_touchup:nothing"), "found no region"),
        ((scene_png, "--caption", "x", "--segmenter", "nomodule_xyz:f"), "cannot import nomodule_xyz"),
        ((scene_png, "--caption", "a red circle", "--strength", 0), "--strength must be in (0, 1]"),
    ]
    for args, message in cases:
        line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "touch-up", *args,
                                           "--artifacts", trained_artifacts, "-o", tmp_path / "out.png"))
        assert message in line, (args, line)
    assert not (tmp_path / "out.png").exists()
    line = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "touch-up", scene_png, "--caption",
                                       "a red circle", "--artifacts", tmp_path))
    assert "train the cascade first (cascade repro)" in line


# --- the diffusion family through the same commands ---------------------------------------------


def test_generate_candidates_and_touch_up_with_the_diffusion_family(smoke_diffusion, smoke_evaluator, scene_png,
                                                                    tmp_path):
    root = tmp_path / "artifacts"
    for name, path in (("base", smoke_diffusion.base), ("superres", smoke_diffusion.superres),
                       ("tokenizer", smoke_diffusion.tokenizer), ("evaluator", smoke_evaluator),
                       ("features", smoke_diffusion.art.features)):
        shutil.copytree(path, root / name)
    tree = yaml.safe_load(PARAMS.read_text())
    tree["generator"]["family"], tree["tokenizer"]["kind"] = "diffusion", "kl"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree, sort_keys=False))
    models = invoke("--params", params, "--profile", "smoke", "models")
    assert models.exit_code == 0 and "base generator (diffusion, latent dit" in models.stdout
    result = invoke("--params", params, "--profile", "smoke", "generate", "a red circle", "--artifacts", root,
                    "--candidates", 2, "--seed", 5, "-o", tmp_path / "best.png")
    assert result.exit_code == 0, result.output
    kept, scores = _scores(result.stdout)
    assert kept == max(scores) and len(scores) == 2
    touched = invoke("--params", params, "--profile", "smoke", "touch-up", scene_png, "--caption", "a red circle",
                     "--artifacts", root, "--strength", 0.7, "-o", tmp_path / "t.png")
    assert touched.exit_code == 0, touched.output
    before, after = _pixels(scene_png), _pixels(tmp_path / "t.png")
    assert (after != before).any() and after.shape == before.shape
    masked = assert_clean_failure(invoke("--params", PARAMS, "--profile", "smoke", "stage", "base", "--phase", "x",
                                         "--root", tmp_path / "nowhere"))
    assert "--phase is for the diffusion family" in masked
