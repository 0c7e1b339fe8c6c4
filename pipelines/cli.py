"""`cascade`: the command line. Thin: it picks paths and config, then calls stage code.

User-fixable failures (bad params, bad data, a failed gate) print one line and exit 1.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from components.config import ConfigError
from components.errors import StageError

app = typer.Typer(
    help="Cascade: train cascaded text-to-image models end to end (data -> validate -> features -> ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state: dict = {"params": None, "profile": None}


@app.callback()
def _global(
    params: Optional[Path] = typer.Option(None, "--params", help="params.yaml to use (default: ./params.yaml)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="smoke | tiny | base256 (default: params.yaml's `profile:`)."),
) -> None:
    _state["params"] = params
    _state["profile"] = profile


def _config(overrides: dict | None = None):
    from components.config import load_config

    return load_config(_state["params"], _state["profile"], overrides)


def user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can act on into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (StageError, ConfigError, FileNotFoundError) as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

    return wrapper


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "item") -> Iterator[Callable[[int], None]]:
    """A tqdm bar driven by `progress(n_done)` callbacks from stage code."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, disable=None) as bar:
        def update(done: int) -> None:
            bar.update(done - bar.n)

        yield update


# --- stages -----------------------------------------------------------------------------------

def run_stage(name: str, cfg, layout, parent_run_id: str | None = None, phase: str | None = None,
              init: Path | None = None):
    """Execute one stage with the DVC layout's paths (what `dvc repro` and `cascade stage` run).
    phase/init: one PixArt phase of the diffusion family's base, from the previous phase's weights."""
    from components import stage as stage_mod

    if name not in stage_mod.STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(stage_mod.STAGES)}")
    if (phase or init) and name != "base":
        raise StageError("--phase and --init only apply to the base stage (the diffusion family's PixArt phases)")
    if name == "data":
        from components import data

        with progress_bar("data", None) as progress:
            return data.execute(cfg, layout.out("data"), layout.metrics("data"), parent_run_id, progress)
    if name == "validate":
        from components import validate

        with progress_bar("validate") as progress:
            return validate.execute(cfg, layout.out("data"), layout.out("validate"), layout.metrics("validate"),
                                    parent_run_id, progress)
    if name == "features":
        from components import features

        with progress_bar("features", None, unit="caption") as progress:
            return features.execute(cfg, layout.out("validate"), layout.out("features"), layout.metrics("features"),
                                    parent_run_id, progress)
    if name == "tokenizer":
        from components import tokenizer

        return tokenizer.execute(cfg, layout.out("data"), layout.out("validate"), layout.out("tokenizer"),
                                 layout.checkpoints("tokenizer"), layout.metrics("tokenizer"), parent_run_id)
    if name == "tokens":
        from components import tokens

        with progress_bar("tokens", None, unit="image") as progress:
            return tokens.execute(cfg, layout.out("data"), layout.out("validate"), layout.out("tokenizer"),
                                  layout.out("tokens"), layout.metrics("tokens"), layout.out("features"),
                                  parent_run_id, progress)
    if name == "base":
        from components import base

        return base.execute(cfg, layout.out("tokens"), layout.out("features"), layout.out("tokenizer"),
                            layout.out("validate"), layout.out("base"), layout.checkpoints("base"),
                            layout.metrics("base"), parent_run_id, phase=phase, init_dir=init)
    if name == "superres":
        from components import superres

        return superres.execute(cfg, layout.out("tokens"), layout.out("features"), layout.out("tokenizer"),
                                layout.out("validate"), layout.out("base"), layout.out("superres"),
                                layout.checkpoints("superres"), layout.metrics("superres"), parent_run_id,
                                data_dir=layout.out("data"))
    if name == "evaluator":
        from components import evaluator

        return evaluator.execute(cfg, layout.out("data"), layout.out("validate"), layout.out("features"),
                                 layout.out("evaluator"), layout.checkpoints("evaluator"), layout.metrics("evaluator"),
                                 parent_run_id)
    if name == "decoder_ft":
        from components import decoder_ft
        from components.scoring import fid_features

        return decoder_ft.execute(cfg, layout.out("data"), layout.out("validate"), layout.out("tokens"),
                                  layout.out("tokenizer"), layout.out("base"), layout.out("superres"),
                                  layout.out("decoder_ft"), layout.checkpoints("decoder_ft"), layout.metrics("decoder_ft"),
                                  parent_run_id, feature_module=fid_features(cfg.evaluate, layout.out("evaluator"),
                                                                             layout.out("features")))
    if name == "evaluate":
        import shutil

        from components import evaluate

        with progress_bar("evaluate", None, unit="image") as progress:
            result = evaluate.execute(cfg, layout.out("data"), layout.out("validate"), layout.out("features"),
                                      layout.out("tokenizer"), layout.out("base"), layout.out("superres"),
                                      layout.out("decoder_ft"), layout.out("evaluator"), layout.out("evaluate"),
                                      layout.metrics("evaluate"), parent_run_id, progress)
        layout.plots("evaluate").parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.out("evaluate") / "curve.csv", layout.plots("evaluate"))  # `dvc plots show`
        return result
    if name == "register":
        from components import register
        from components.io import frame_digest, read_accepted

        return register.execute(cfg, layout.out("tokenizer"), layout.out("base"), layout.out("superres"),
                                layout.out("decoder_ft"), layout.out("evaluate"), layout.out("register"),
                                layout.metrics("register"), frame_digest(read_accepted(layout.out("validate"))),
                                parent_run_id)
    raise AssertionError(name)


@app.command()
@user_errors
def stage(
    name: str = typer.Argument(..., help="Stage to run: data | validate | features | evaluator | tokenizer | tokens | base | superres | decoder_ft | evaluate | register."),
    root: Path = typer.Option(Path("."), "--root", help="Folder holding artifacts/, metrics/ and checkpoints/ (a Kubeflow TrainJob's work folder)."),
    phase: Optional[str] = typer.Option(None, "--phase", help="base, diffusion family: run only this PixArt phase (diffusion.base.phases)."),
    init: Optional[Path] = typer.Option(None, "--init", help="With --phase: the previous phase's exported weights to start from."),
) -> None:
    """Run one pipeline stage with the default layout (artifacts/<stage>, metrics/<stage>.json). dvc.yaml calls this.

    Under torchrun (or a Kubeflow TrainJob) every rank runs it; only rank 0 writes and records results."""
    from components.stage import Layout

    result = run_stage(name, _config(), Layout(root=root), phase=phase, init=init)
    typer.echo(f"{name}: " + ", ".join(f"{k}={v:g}" for k, v in result.metrics.items()))


@app.command()
@user_errors
def repro(
    force: bool = typer.Option(False, "--force", help="Re-run every stage even if DVC finds it up to date."),
    target: Optional[str] = typer.Argument(None, help="Run only up to this stage (default: all)."),
) -> None:
    """Run the pipeline with `dvc repro` under one MLflow parent run (the embedded default end to end)."""
    from components import tracking
    from components.config import load_config
    from components.stage import Layout

    cfg = load_config(_state["params"])  # the profile DVC sees: params.yaml's own `profile:`
    if _state["profile"] and _state["profile"] != cfg.profile:
        raise StageError(f"dvc repro uses params.yaml's `profile: {cfg.profile}`; edit it "
                         f"(or `dvc exp run -S profile={_state['profile']}`) instead of passing --profile")
    parent = tracking.start_pipeline_run(cfg.tracking.experiment, cfg.profile, launcher="dvc")
    cmd = [sys.executable, "-m", "dvc", "repro"] + (["--force"] if force else []) + ([target] if target else [])
    # dvc.yaml calls `cascade stage ...`: make it this environment's cascade even if .venv is not activated.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, tracking.PARENT_RUN_ENV: parent, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    typer.echo(f"pipeline run {parent} (profile {cfg.profile}); running: {' '.join(cmd[2:])}")
    code = subprocess.call(cmd, env=env)
    tracking.finish_pipeline_run(parent, ok=code == 0, reason=None if code == 0 else f"dvc repro exited {code}")
    if code != 0:
        raise StageError(f"dvc repro failed (exit {code}); the failing stage's message is above")
    typer.echo(next_steps(Layout(), tracking.tracking_uri()))


def next_steps(layout, tracking_uri: str) -> str:
    """What `cascade repro` prints at the end: the registered model, the report and what to run next."""
    import json

    lines = ["done. Metrics: `dvc metrics show`; plots: `dvc plots show`",
             f"runs and registered models: mlflow ui --backend-store-uri {tracking_uri}"]
    report = layout.out("evaluate") / "report.html"
    if report.is_file():
        lines.append(f"evaluation report: {report} (also report.md; the FID-vs-CLIP curve is curve.png)")
    registration = layout.out("register") / "registration.json"
    if registration.is_file():
        record = json.loads(registration.read_text())
        lines.append(f"registered: {record['model_name']} version {record['version']} -> alias {record['alias']} "
                     f"({record['decision']})")
    if (layout.out("superres") / "generator.json").is_file():
        lines.append('try it: cascade generate "two small red circles above a blue square" -o sample.png')
    return "\n".join(lines)


# --- data commands ----------------------------------------------------------------------------

@app.command()
@user_errors
def ingest(
    source: str = typer.Argument(..., help="webdataset .tar shards (dir, file or {00..09} pattern), an image folder with metadata.jsonl, or a .parquet/.csv manifest; local path or fsspec URL."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for normalized shards + manifest.parquet."),
    shard_size: Optional[int] = typer.Option(None, help="Items per output shard (default: params data.shard_size)."),
) -> None:
    """Ingest user data into the normalized shard + manifest layout (then run `cascade validate OUT`)."""
    from components.ingest import ingest as do_ingest, summarize

    cfg = _config().data
    with progress_bar("ingest") as progress:
        result = do_ingest(source, out, shard_size or cfg.shard_size, cfg.val_fraction, cfg.test_fraction, progress=progress)
    typer.echo(summarize(result))


@app.command()
@user_errors
def validate(
    data_dir: Path = typer.Argument(..., help="A dataset directory (manifest.parquet + shards/) from `cascade ingest` or the data stage."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write accepted/quarantine manifests and Data Docs (default: DATA_DIR/validation)."),
) -> None:
    """Validate a dataset: quarantine bad items with reasons, run the GX suite. Exit 0 on pass, 1 on fail."""
    from components import validate as validate_mod

    out = out or data_dir / "validation"
    try:
        with progress_bar("validate") as progress:
            result = validate_mod.run(_config().validate, data_dir, out, progress)
    except StageError:
        typer.echo(validate_mod.summarize_dir(out))
        raise
    typer.echo(validate_mod.summarize(result))


@app.command()
@user_errors
def check(
    image: Path = typer.Argument(..., help="An image file (PNG/JPEG)."),
    caption: str = typer.Argument(..., help="Its prompt, in the shapes grammar, e.g. 'two small red circles above a large blue square'."),
) -> None:
    """Score one image against its prompt with the exact checker (colour, shape, count, position)."""
    from PIL import Image

    from models.checker import check as exact_check

    try:
        with Image.open(image) as im:
            result = exact_check(im.convert("RGB"), caption)
    except (ValueError, OSError, Image.DecompressionBombError) as err:  # bad caption; unreadable image
        raise StageError(str(err)) from None
    for category, ok in result.to_dict().items():
        typer.echo(f"{category:>9}: {ok}")
    raise typer.Exit(0 if result.correct else 1)


@app.command()
@user_errors
def config(
    section: Optional[str] = typer.Argument(None, help="Only this section, e.g. data or features.encoder."),
) -> None:
    """Print the resolved config (params.yaml with the profile applied) as YAML."""
    import yaml

    from components.config import to_dict

    tree = to_dict(_config())
    for part in (section.split(".") if section else []):
        if not isinstance(tree, dict) or part not in tree:
            raise ConfigError(f"{section}: no such section")
        tree = tree[part]
    typer.echo(yaml.safe_dump(tree, sort_keys=False).rstrip())


@app.command()
@user_errors
def models() -> None:
    """List the profile's models with parameter counts, built on the meta device (nothing is trained or loaded)."""
    from models.text_encoder import parameter_count

    cfg = _config()
    enc = cfg.features.encoder
    try:
        n = parameter_count(enc.kind, enc.path)
    except ValueError as err:
        raise StageError(str(err)) from None
    typer.echo(f"profile {cfg.profile}")
    typer.echo(f"  text encoder ({enc.kind}, frozen): {n / 1e6:.1f}M parameters")
    import torch

    from components.tokenizer import spec_for
    from models.tokenizer import ImageTokenizer

    from components.tokenizer import tokenizers_for

    for which in tokenizers_for(cfg):
        spec = spec_for(cfg.tokenizer, which)
        with torch.device("meta"):  # shapes only: no memory, no weights
            count = sum(p.numel() for p in ImageTokenizer(spec).parameters())
        typer.echo(f"  {which} tokenizer ({spec.kind}, {spec.resolution}px f{spec.downsample}, "
                   f"{spec.grid}x{spec.grid} tokens, codebook {spec.codebook_size}): {count / 1e6:.1f}M parameters")
    from models.text_encoder import hidden_size

    if cfg.generator.family == "diffusion":
        _diffusion_models(cfg, hidden_size(enc.kind, enc.path), enc.max_length)
        return
    from types import SimpleNamespace

    from components.generator import spec_for as generator_spec_for
    from models.masked_transformer import MaskedTransformer

    # what the tokens and features stages would record, from params alone: the stages' own spec_for
    # then builds each spec, so this listing cannot drift from what training builds
    token_meta = {which: {"kind": "vqgan", "codebook_size": tok.codebook_size, "grid": tok.grid}
                  for which, tok in (("base", spec_for(cfg.tokenizer, "base")), ("superres", spec_for(cfg.tokenizer, "superres")))}
    features = SimpleNamespace(dim=hidden_size(enc.kind, enc.path), max_length=enc.max_length)
    for which in ("base", "superres"):
        m = getattr(cfg, which).model
        spec = generator_spec_for(getattr(cfg, which), SimpleNamespace(meta=token_meta), features, which)
        with torch.device("meta"):
            count = sum(p.numel() for p in MaskedTransformer(spec).parameters())
        typer.echo(f"  {which} generator (masked transformer, {m.depth} layers x {m.width}, "
                   f"{spec.n_tokens} tokens): {count / 1e6:.1f}M parameters")


def _diffusion_models(cfg, text_dim: int, text_length: int) -> None:
    import torch

    from components.diffusion import latent_spec, superres_spec
    from components.tokenizer import spec_for
    from models.diffusion import DiffusionModel

    vae = spec_for(cfg.tokenizer, "base")
    for which, spec in (("base", latent_spec(cfg, vae.latent_channels, vae.grid, text_dim, text_length)),
                        ("superres", superres_spec(cfg, text_dim, text_length))):
        with torch.device("meta"):
            count = sum(p.numel() for p in DiffusionModel(spec).parameters())
        what = (f"latent {spec.backbone} on {spec.channels_in}x{spec.size}x{spec.size} latents" if which == "base"
                else f"pixel U-Net {spec.low_res}->{spec.size}px")
        typer.echo(f"  {which} generator (diffusion, {what}, {spec.prediction}): {count / 1e6:.1f}M parameters")


# --- inference --------------------------------------------------------------------------------

@app.command()
@user_errors
def generate(
    prompts: list[str] = typer.Argument(..., help="One or more prompts, e.g. 'two small red circles above a blue square'."),
    output: Path = typer.Option(Path("out.png"), "--output", "-o", help="PNG path; with several images, -0, -1, ... are appended."),
    seed: int = typer.Option(0, help="Image i of the run uses seed + i; the same seed gives the same images."),
    guidance: Optional[float] = typer.Option(None, help="Base-model guidance scale (default: params base.sample.guidance)."),
    steps: Optional[int] = typer.Option(None, help="Base-model decoding steps (default: params base.sample.steps)."),
    superres_guidance: Optional[float] = typer.Option(None, help="Super-res guidance (default: params superres.sample.guidance)."),
    superres_steps: Optional[int] = typer.Option(None, help="Super-res decoding steps (default: params superres.sample.steps)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Replaces the unconditional logits in guidance."),
    batch: int = typer.Option(1, "--batch", help="Images per prompt."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="Edit this image instead of generating from scratch (needs --mask)."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="With --init-image: a PNG whose white pixels mark the region to regenerate."),
    outpaint: bool = typer.Option(False, "--outpaint", help="With --init-image: regenerate outside the mask instead of inside."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Rejection sampling: draw N candidates per image and keep the one the scorer (params inference.scorer) rates best; 1 = off (default: params inference.candidates; generation only, not --init-image edits)."),
    artifacts: Path = typer.Option(Path("artifacts"), help="Where the trained stages' outputs are (the DVC layout)."),
) -> None:
    """Text -> PNG with the trained cascade (either family); with --candidates N, the best of N by a preference scorer."""
    from components.cascades import load_for_inference
    from components.images import to_uint8

    if candidates is not None and candidates < 1:
        raise StageError(f"--candidates must be >= 1, got {candidates}")
    if candidates is not None and candidates > 1 and init_image is not None:
        raise StageError("--candidates applies to generation; it cannot be combined with --init-image")
    if batch < 1:
        raise StageError(f"--batch must be >= 1, got {batch}")
    for name, value in (("--steps", steps), ("--superres-steps", superres_steps)):
        if value is not None and value < 1:
            raise StageError(f"{name} must be >= 1 (sampler steps must be a positive integer), got {value}")
    for name, value in (("--guidance", guidance), ("--superres-guidance", superres_guidance)):
        if value is not None and not value >= 0:
            raise StageError(f"{name} must be a number >= 0, got {value}")
    if (init_image is None) != (mask is None):
        raise StageError("editing needs both --init-image and --mask")
    cfg = _config()
    # the params value applies to generation only: an edit keeps the one image it is asked for
    n = candidates if candidates is not None else (1 if init_image is not None else cfg.inference.candidates)
    cascade = load_for_inference(cfg, artifacts)
    all_prompts = [p for p in prompts for _ in range(batch)]
    notes = [""] * len(all_prompts)
    try:
        if init_image is not None:
            images = cascade.edit(all_prompts, *_edit_inputs(init_image, mask, cascade.resolution, len(all_prompts)),
                                  seed=seed, outpaint=outpaint, guidance=guidance, steps=steps)
        elif n > 1:
            images, notes = _best_of(cascade, cfg, artifacts, all_prompts, n, seed, negative_prompt,
                                     dict(guidance=guidance, superres_guidance=superres_guidance, steps=steps,
                                          superres_steps=superres_steps))
        else:
            images = cascade.generate(all_prompts, seed=seed, negative_prompt=negative_prompt, guidance=guidance,
                                      steps=steps, superres_guidance=superres_guidance, superres_steps=superres_steps)
    except ValueError as err:  # bad sampler settings
        raise StageError(str(err)) from None
    from PIL import Image

    pixels = to_uint8(images)
    paths = [output] if len(pixels) == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(pixels))]
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, image, prompt, note in zip(paths, pixels, all_prompts, notes):
        Image.fromarray(image).save(path)
        typer.echo(f"{path}: {prompt}{note}")


def _best_of(cascade, cfg, artifacts: Path, prompts: list[str], n: int, seed: int, negative_prompt: str | None,
             settings: dict):
    """Rejection sampling: (images [B,3,R,R], one "  score ..." note per image). Candidate j of image i uses
    seed + i*n + j, so --candidates 1 would give exactly the plain images."""
    from components.preference import for_prompts, load_scorer
    from models.rejection import rejection_sample

    encoder = getattr(cascade, "text_encoder", None)
    scorer = load_scorer(cfg.inference.scorer, artifacts, getattr(encoder, "fingerprint", None))
    text, mask = cascade.encode_text(prompts)
    extra = {k: v for k, v in settings.items() if k in ("guidance", "superres_guidance") or v is not None}
    negative = cascade.encode_text([negative_prompt]) if negative_prompt else None

    def generate(t, m, seeds):
        if negative is not None:  # the families that take negative prompts take their features this way
            extra.update(negative_text=negative[0].expand(len(seeds), -1, -1),
                         negative_mask=negative[1].expand(len(seeds), -1))
        return cascade.generate_from_text(t, m, seeds=seeds, **extra)

    result = rejection_sample(generate, text, mask, n, for_prompts(scorer, prompts, text, mask), seed=seed)
    notes = [f"  ({scorer.name} score {float(row[j]):.2f}, best of {n}: "
             + ", ".join(f"{float(x):.2f}" for x in row) + ")" for row, j in zip(result.scores, result.chosen)]
    return result.images, notes


def _edit_inputs(image_path: Path, mask_path: Path, resolution: int, n: int):
    """(images [n,3,R,R] in [-1,1], region [n,R,R] bool) from an image and a mask file."""
    from PIL import Image

    from components.images import square_resize, to_tensor

    try:
        with Image.open(image_path) as im:
            image = to_tensor(square_resize(im.convert("RGB"), resolution, str(image_path)))
        with Image.open(mask_path) as m:
            region = to_tensor(square_resize(m.convert("RGB"), resolution, str(mask_path))).mean(0) > 0
    except OSError as err:
        raise StageError(f"cannot read the edit inputs: {err}") from None
    return image.expand(n, -1, -1, -1), region.expand(n, -1, -1)


@app.command(name="touch-up")
@user_errors
def touch_up(
    image: Path = typer.Argument(..., help="The image to touch up (PNG/JPEG), e.g. one `cascade generate` wrote."),
    caption: str = typer.Option(..., "--caption", help="What the region should show, e.g. 'a red circle'; without --mask/--segmenter it also finds the region (the matching objects, grown by feather + 1 pixels)."),
    output: Path = typer.Option(Path("touched.png"), "--output", "-o", help="Where to write the touched-up PNG."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="A PNG of the image's size whose white pixels mark the region."),
    segmenter: Optional[str] = typer.Option(None, "--segmenter", help="module:function called with (uint8 HxWx3 image, caption), returning a bool HxW region mask."),
    strength: Optional[float] = typer.Option(None, "--strength", help="img2img strength in (0, 1]: share of the crop re-generated (default: params inference.touchup.strength)."),
    expand: Optional[float] = typer.Option(None, "--expand", help="Crop = region's box grown by this fraction of its side per edge (default: params inference.touchup.expand)."),
    feather: Optional[int] = typer.Option(None, "--feather", help="Blend-mask feather in pixels, inside the region (default: params inference.touchup.feather)."),
    seed: int = typer.Option(0, help="The img2img seed; the same seed gives the same result."),
    artifacts: Path = typer.Option(Path("artifacts"), help="Where the trained stages' outputs are (the DVC layout)."),
) -> None:
    """Re-generate one region of an image: find it (the exact checker's segmentation, a mask or your segmenter),
    crop it with context, img2img the crop under --caption, blend it back; pixels outside the region are kept."""
    import numpy as np
    import torch
    from PIL import Image

    from components.cascades import load_for_inference
    from components.images import to_tensor, to_uint8
    from models import touchup as touchup_mod

    if mask is not None and segmenter is not None:
        raise StageError("pass either --mask or --segmenter, not both")
    cfg = _config()
    t = cfg.inference.touchup
    strength = t.strength if strength is None else strength
    expand = t.expand if expand is None else expand
    feather = t.feather if feather is None else feather
    if not 0 < strength <= 1:
        raise StageError(f"--strength must be in (0, 1], got {strength}")
    if not expand >= 0:
        raise StageError(f"--expand must be >= 0, got {expand}")
    if feather < 0:
        raise StageError(f"--feather must be >= 0, got {feather}")
    pixels = _read_rgb(image)  # [H,W,3] uint8
    try:
        if mask is not None:
            region = _read_mask(mask, pixels.shape[:2])
        elif segmenter is not None:
            region = touchup_mod.segment_region(touchup_mod.load_segmenter(segmenter), pixels, caption)
        else:
            from models.checker import region_mask

            # the segmentation ends at half coverage: grow past the object's blurred fringe and the feather
            # ramp, or the old object's outline would stay behind around the new one
            region = region_mask(pixels, caption, grow=feather + 1)
    except ValueError as err:  # bad caption, no matching object, a segmenter that cannot be used
        raise StageError(str(err)) from None
    if not region.any():
        raise StageError(f"{mask}: the region is empty (no white pixels)")
    cascade = load_for_inference(cfg, artifacts)
    try:
        out = touchup_mod.touch_up(to_tensor(Image.fromarray(pixels)), torch.from_numpy(np.ascontiguousarray(region)),
                                   caption, cascade, expand=expand, strength=strength, feather=feather, seed=seed)
    except ValueError as err:
        raise StageError(str(err)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(out[None])[0]).save(output)
    x0, y0, side = touchup_mod.crop_box(torch.from_numpy(np.ascontiguousarray(region)), expand)
    typer.echo(f"{output}: {caption!r} re-generated in {int(region.sum())} pixels "
               f"(crop {side}x{side} at {x0},{y0}; strength {strength:g}, seed {seed})")


def _read_rgb(path: Path):
    """[H,W,3] uint8 from an image file; one-line StageError if it cannot be read."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise StageError(f"{path}: cannot read the image ({err})") from None


def _read_mask(path: Path, size: tuple[int, int]):
    """bool [H,W] (white-ish pixels) from a mask image that must match the image's size."""
    pixels = _read_rgb(path)
    if pixels.shape[:2] != tuple(size):
        raise StageError(f"{path}: the mask is {pixels.shape[1]}x{pixels.shape[0]}, the image {size[1]}x{size[0]}")
    return pixels.mean(axis=2) >= 128


# --- KFP ---------------------------------------------------------------------------------------

@app.command(name="compile")
@user_errors
def compile_(
    output: Path = typer.Option(Path("pipelines/cascade_pipeline.yaml"), "--output", "-o", help="Where to write the compiled pipeline YAML."),
) -> None:
    """Compile the Kubeflow pipeline to YAML (upload it in the Kubeflow Pipelines UI).

    Placement (images, node pools, accelerators) is the profile's `kubeflow:` section: pass
    --profile base256 to compile for that profile's cluster layout."""
    from pipelines.kfp_pipeline import compile_pipeline

    compile_pipeline(output, params_path=_state["params"], profile=_state["profile"])
    typer.echo(f"wrote {output}")


@app.command()
@user_errors
def submit(
    host: str = typer.Option(..., "--host", help="Kubeflow Pipelines endpoint, e.g. http://localhost:8080 after `kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`."),
    param: list[str] = typer.Option([], "--param", help="Pipeline parameter KEY=VALUE: data_source, model_name, max_fid, min_clip_score, min_checker_single, promotion_margin. Repeatable."),
    experiment: str = typer.Option("cascade", "--experiment", help="Kubeflow Pipelines experiment to file the run under."),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run name (default: KFP's)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Kubeflow namespace (default: params kubeflow.namespace)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="KFP_TOKEN", help="Bearer token for an authenticated endpoint (or $KFP_TOKEN)."),
) -> None:
    """Compile the pipeline for the profile and start a run on a Kubeflow Pipelines cluster."""
    from pipelines.submit import submit as do_submit

    run = do_submit(host, _state["params"], _state["profile"], param, experiment, run_name, namespace, token)
    typer.echo(f"submitted run {run.run_id} ({', '.join(f'{k}={v}' for k, v in run.arguments.items())})")
    typer.echo(f"  {run.url}")


@app.command(name="run")
@user_errors
def run_pipeline(
    local: bool = typer.Option(False, "--local", help="Run the KFP DAG on this machine with kfp.local (SubprocessRunner)."),
    pipeline_root: Path = typer.Option(Path("artifacts/kfp"), help="Where kfp.local writes task outputs."),
    data_source: str = typer.Option("", help="Override data.source (path or fsspec URL)."),
) -> None:
    """Run the KFP pipeline on this machine (--local); for a cluster use `cascade submit --host URL`."""
    if not local:
        raise StageError("`cascade run` needs --local; for a cluster use `cascade submit --host URL` "
                         "(or upload `cascade compile` output in the Kubeflow UI)")
    from pipelines.local import run_local

    cfg = _config()
    outputs = run_local(pipeline_root, profile=cfg.profile, params_path=_state["params"], data_source=data_source)
    for name, path in outputs.items():
        typer.echo(f"{name}: {path}")


# --- registry ----------------------------------------------------------------------------------

@app.command()
@user_errors
def promote(
    model: str = typer.Option(..., "--model", help="Registered model name, e.g. cascade-tiny (params register.model_name)."),
    version: str = typer.Option(..., "--version", help="The version to promote."),
    force: bool = typer.Option(False, "--force", help="Make it the champion even if the gates fail (needs --reason)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why the gates are overridden; recorded on the version."),
) -> None:
    """Apply the promotion gates (params register.gates) to a registered version: alias champion or challenger."""
    from components.registry import promote as do_promote

    decision = do_promote(model, version, _config().register.gates, force=force, reason=reason)
    outcome = "forced" if force else decision.outcome
    typer.echo(f"{model} version {version}: {outcome} -> alias {decision.alias}")
    for line in decision.reasons:
        typer.echo(f"  {line}")


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
