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

def run_stage(name: str, cfg, layout, parent_run_id: str | None = None):
    """Execute one stage with the DVC layout's paths (what `dvc repro` and `cascade stage` run)."""
    from components import stage as stage_mod

    if name not in stage_mod.STAGES:
        raise StageError(f"unknown stage {name!r}; stages: {', '.join(stage_mod.STAGES)}")
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
                            layout.metrics("base"), parent_run_id)
    if name == "superres":
        from components import superres

        return superres.execute(cfg, layout.out("tokens"), layout.out("features"), layout.out("tokenizer"),
                                layout.out("validate"), layout.out("base"), layout.out("superres"),
                                layout.checkpoints("superres"), layout.metrics("superres"), parent_run_id)
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
) -> None:
    """Run one pipeline stage with the default layout (artifacts/<stage>, metrics/<stage>.json). dvc.yaml calls this.

    Under torchrun (or a Kubeflow TrainJob) every rank runs it; only rank 0 writes and records results."""
    from components.stage import Layout

    result = run_stage(name, _config(), Layout(root=root))
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

    from components.tokenizer import WHICH, spec_for
    from models.tokenizer import ImageTokenizer

    for which in WHICH:
        spec = spec_for(cfg.tokenizer, which)
        with torch.device("meta"):  # shapes only: no memory, no weights
            count = sum(p.numel() for p in ImageTokenizer(spec).parameters())
        typer.echo(f"  {which} tokenizer ({spec.kind}, {spec.resolution}px f{spec.downsample}, "
                   f"{spec.grid}x{spec.grid} tokens, codebook {spec.codebook_size}): {count / 1e6:.1f}M parameters")
    if cfg.tokenizer.kind != "vqgan":
        return
    from models.masked_transformer import MaskedTransformer, MaskedTransformerSpec
    from models.text_encoder import hidden_size

    base_tok, sr_tok = spec_for(cfg.tokenizer, "base"), spec_for(cfg.tokenizer, "superres")
    for which, tok, cond in (("base", base_tok, {}),
                             ("superres", sr_tok, {"cond_codebook_size": base_tok.codebook_size,
                                                   "cond_grid": base_tok.grid,
                                                   "cond_depth": cfg.superres.model.cond_depth})):
        m = getattr(cfg, which).model
        spec = MaskedTransformerSpec(codebook_size=tok.codebook_size, grid=tok.grid,
                                     text_dim=hidden_size(enc.kind, enc.path), text_length=enc.max_length,
                                     width=m.width, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio,
                                     dropout=m.dropout, **cond)
        with torch.device("meta"):
            count = sum(p.numel() for p in MaskedTransformer(spec).parameters())
        typer.echo(f"  {which} generator (masked transformer, {m.depth} layers x {m.width}, "
                   f"{spec.n_tokens} tokens): {count / 1e6:.1f}M parameters")


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
    artifacts: Path = typer.Option(Path("artifacts"), help="Where the trained stages' outputs are (the DVC layout)."),
) -> None:
    """Text -> base tokens -> super-res tokens -> decoder -> PNG, with the trained cascade."""
    from components.images import to_uint8
    from components.superres import load_for_inference

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
    finetuned = artifacts / "decoder_ft"  # the decoder_ft stage's larger decoder, once it has run
    cascade = load_for_inference(_config(), artifacts / "base", artifacts / "superres", artifacts / "tokenizer",
                                 finetuned if (finetuned / "tokenizer.json").is_file() else None)
    all_prompts = [p for p in prompts for _ in range(batch)]
    try:
        if init_image is not None:
            images = cascade.edit(all_prompts, *_edit_inputs(init_image, mask, cascade.resolution, len(all_prompts)),
                                  seed=seed, outpaint=outpaint, guidance=guidance, steps=steps)
        else:
            images = cascade.generate(all_prompts, seed=seed, negative_prompt=negative_prompt, guidance=guidance,
                                      steps=steps, superres_guidance=superres_guidance, superres_steps=superres_steps)
    except ValueError as err:  # bad sampler settings
        raise StageError(str(err)) from None
    from PIL import Image

    pixels = to_uint8(images)
    paths = [output] if len(pixels) == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(pixels))]
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, image, prompt in zip(paths, pixels, all_prompts):
        Image.fromarray(image).save(path)
        typer.echo(f"{path}: {prompt}")


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
