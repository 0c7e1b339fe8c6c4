"""Diffusion family: base training step from precomputed latents vs online encoding; samplers; families side by side.

Training step (same DiT/U-Net, batch, optimizer, keys; one process, interleaved repeats):
  precomputed  KL latents from the `tokens` stage + text features from the `features` stage (what the
               diffusion `base` stage trains on), then the diffusion loss, backward, AdamW step
  online       the same batch read from the image shards, encoded by the KL-VAE and its captions by the
               frozen text encoder, then the same step
Sampling: the full diffusion cascade (text -> latent base -> KL decoder -> pixel super-res) at the
profile's default steps, DPM-Solver++ (the default) against DDIM at the same step count, images/s.
Super-res fidelity: real test images downscaled to the low-res side and upsampled again, by the
super-res model (under each thresholding mode) and by bilinear interpolation (the baseline), PSNR.
Families: the masked and the diffusion family's recorded metrics on the same profile side by side
(training time per stage, FID/CLIP over the guidance sweep, exact checker, sampling images/s).

Reads two trained pipelines' outputs (the masked run in --masked-root, the diffusion run in --root
with its params file):

    .venv/bin/python benchmarks/bench_diffusion.py --root /work/tinydiff --params /work/tinydiff/params.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_generator import timed_steps  # noqa: E402
from benchmarks.common import OnlineInputs, machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402
from components.diffusion import LatentTextDataset, base_spec, latent_statistics  # noqa: E402
from components.generator import open_stores  # noqa: E402
from components.images import ShardImageDataset  # noqa: E402

TRAINING_STAGES = ("tokenizer", "base", "superres", "decoder_ft")


def make_step(cfg, spec):
    """One diffusion training step on a batch dict; the same code for both data paths."""
    from models.diffusion import DiffusionModel, diffusion_loss, drop_text, training_schedule

    torch.manual_seed(0)
    model = DiffusionModel(spec).train()
    schedule = training_schedule(spec)
    t = cfg.diffusion.base.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.diffusion.base.phases[-1].lr, betas=tuple(t.betas))
    g = torch.Generator().manual_seed(0)

    def step(batch: dict) -> None:
        dropped = torch.rand(batch["x0"].shape[0], generator=g) < t.text_dropout
        text, mask = drop_text(batch["text"], batch["text_mask"], dropped)
        loss = diffusion_loss(model, schedule, batch["x0"], text, mask, g).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def online_batch(keys: list[str], online: OnlineInputs, spec) -> dict:
    """What training would do without the tokens and features stages."""
    from models.diffusion import from_latents

    with torch.no_grad():
        x0 = from_latents(spec, online.tokenizer.encode(online.pixels(keys)))
    text, mask = online.text(keys)
    return {"x0": x0, "text": text, "text_mask": mask}


def sampling_rate(cascade, prompts: list[str], batch: int) -> float:
    cascade.generate(prompts[:2], seed=0)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        cascade.generate(prompts[i:i + batch], seed=i)
    return len(prompts) / (time.perf_counter() - start)


def superres_fidelity(cascade, art: Path, n: int) -> tuple[float, dict[str, float]]:
    """PSNR against n test images at the output side when the super-res model upsamples their real
    low-res copies: bilinear upsampling (the baseline), and the model under each thresholding mode."""
    import torch.nn.functional as F

    from components.features import FeatureStore
    from components.tokenizer import _split
    from components.tokenizer import read_accepted as image_rows
    from models.diffusion_sampling import sample
    from models.losses import psnr

    R, r = cascade.resolution, cascade.superres.spec.low_res
    rows = _split(image_rows(art / "validate"), "test").head(n)
    images = ShardImageDataset(art / "data", rows, R)
    high = torch.stack([images[i] for i in range(len(images))])  # [n,3,R,R]
    low = F.interpolate(high, size=(r, r), mode="area")
    text, mask = FeatureStore.open(art / "features").lookup(images.keys)
    bilinear = float(psnr(F.interpolate(low, size=(R, R), mode="bilinear", align_corners=False).clamp(-1, 1), high))
    by_mode = {}
    for mode in ("none", "static", "dynamic"):
        settings = cascade.settings.superres.replace(thresholding=mode)
        out = sample(cascade.superres, text, mask, settings, list(range(len(images))), low_res=low,
                     aug_level=cascade.settings.aug_level)
        by_mode[mode] = float(psnr(out.clamp(-1, 1), high))
    return bilinear, by_mode


def read_metrics(root: Path, stage: str) -> dict:
    path = root / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def family_rows(name: str, root: Path) -> dict:
    """A finished run's recorded figures: training seconds per stage, the sweep, the checker."""
    m = {stage: read_metrics(root, stage) for stage in (*TRAINING_STAGES, "evaluate")}
    train = {stage: m[stage].get("train_seconds", sum(v for k, v in m[stage].items() if k.endswith(".train_seconds")))
             for stage in TRAINING_STAGES}
    # a stage that resumed a finished checkpoint recorded only the time of its last process
    resumed = {stage: any(v > 0 for k, v in m[stage].items() if k.endswith("resumed_from_step"))
               for stage in TRAINING_STAGES}
    curve_path = root / "artifacts" / "evaluate" / "curve.csv"
    curve = pd.read_csv(curve_path) if curve_path.is_file() else pd.DataFrame()
    return {"name": name, "train": train, "resumed": resumed, "evaluate": m["evaluate"], "curve": curve}


def side_by_side(rows: list[dict]) -> list[str]:
    names = [r["name"] for r in rows]
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(rows)]

    def add(label: str, values: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    for stage in TRAINING_STAGES:
        add(f"train {stage} (s)", [f"{r['train'][stage]:.0f}" + (" (part resumed)" if r["resumed"][stage] else "")
                                   for r in rows])
    add("train total (s)", [f"{sum(r['train'].values()):.0f}" for r in rows])
    add("sampling, full cascade (images/s)", [f"{r['evaluate'].get('generate_images_per_second', float('nan')):.2f}"
                                              for r in rows])
    add("default guidance", [f"{r['evaluate'].get('default_guidance', float('nan')):g}" for r in rows])
    for key, label in (("fid", "FID (evaluator features) at default"), ("clip_score", "CLIP score at default"),
                       ("checker_single", "checker: single objects colour+shape"),
                       ("checker_pair", "checker: two objects + relation"), ("checker_colour", "checker: colour"),
                       ("checker_shape", "checker: shape"), ("checker_count", "checker: count"),
                       ("checker_position", "checker: position")):
        fmt = (lambda v: f"{100 * v:.1f}%") if key.startswith("checker") else (lambda v: f"{v:.3g}")
        add(label, [fmt(r["evaluate"][key]) if key in r["evaluate"] else "n/a" for r in rows])
    lines += ["", "FID / CLIP over the guidance sweep:", "",
              "| guidance | " + " | ".join(f"{n} FID | {n} CLIP" for n in names) + " |",
              "| ---: |" + " ---: | ---: |" * len(rows)]
    scales = sorted(set().union(*[set(r["curve"].get("guidance", [])) for r in rows]))
    for g in scales:
        cells = []
        for r in rows:
            hit = r["curve"][r["curve"]["guidance"] == g] if len(r["curve"]) else []
            cells += [f"{hit['fid'].iloc[0]:.3g}", f"{hit['clip_score'].iloc[0]:.2f}"] if len(hit) else ["n/a", "n/a"]
        lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the diffusion run (artifacts/, metrics/)")
    parser.add_argument("--params", type=Path, required=True, help="its params file (generator.family: diffusion)")
    parser.add_argument("--masked-root", type=Path, default=REPO, help="the masked run on the same profile")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="prompts per sampling batch")
    parser.add_argument("--sample-batches", type=int, default=2)
    parser.add_argument("--sr-images", type=int, default=32, help="test images for the super-res fidelity check")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    from components.diffusion import load_for_inference
    from models.diffusion_cascade import DiffusionCascadeSettings

    cfg = load_config(args.params, args.profile)
    if cfg.generator.family != "diffusion":
        raise SystemExit(f"{args.params}: generator.family must be diffusion")
    art = args.root / "artifacts"
    tokens, features = open_stores(art / "tokens", art / "features")
    keys = tokens.keys[tokens.keys["split"] == "train"]["key"].tolist()
    shift, scale = latent_statistics(tokens, keys)
    spec = base_spec(cfg, tokens, features, shift, scale)
    dataset = LatentTextDataset(tokens, features, keys, shift, scale)
    inputs = OnlineInputs(cfg, art)

    batch_size = cfg.diffusion.base.train.batch_size
    rng = np.random.default_rng(0)
    batch_keys = [[keys[i] for i in rng.integers(0, len(keys), batch_size)] for _ in range(args.steps)]
    pre_idx = [[dataset.keys.index(k) for k in b] for b in batch_keys]
    step = make_step(cfg, spec)
    step(dataset.__getitems__(pre_idx[0]))  # warm-up
    pre, online = [], []
    for _ in range(args.repeats):
        pre.append(timed_steps(step, [lambda i=i: dataset.__getitems__(i) for i in pre_idx]))
        online.append(timed_steps(step, [lambda b=b: online_batch(b, inputs, spec)
                                   for b in batch_keys]))
    pre_s, online_s = min(pre) / args.steps, min(online) / args.steps

    decoder = art / "decoder_ft"
    cascade = load_for_inference(cfg, art / "base", art / "superres", art / "tokenizer",
                                 decoder if (decoder / "tokenizer.json").is_file() else None)
    test = inputs.accepted[inputs.accepted["split"] == "test"]["caption"].tolist()
    n = args.batch * args.sample_batches
    prompts = (test * (1 + n // max(len(test), 1)))[:n]
    s = cascade.settings
    rates = {}
    for sampler in ("dpm", "ddim"):
        cascade.settings = DiffusionCascadeSettings(s.base.replace(sampler=sampler), s.superres.replace(sampler=sampler),
                                                    s.aug_level)
        rates[sampler] = sampling_rate(cascade, prompts, args.batch)
    cascade.settings = s

    bilinear, by_mode = superres_fidelity(cascade, art, args.sr_images)

    d = cfg.diffusion.base
    arch = (f"DiT {d.dit.depth} x {d.dit.width}, patch {d.dit.patch_size}" if d.backbone == "dit"
            else f"U-Net {list(d.unet.channels)}")
    lines = [
        "## Diffusion family: training step from precomputed latents vs online encoding; samplers; the two families",
        "",
        f"Regenerated by `benchmarks/bench_diffusion.py --root {args.root} --params {args.params} --steps {args.steps}` "
        f"(profile {cfg.profile}); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        f"Base model: {arch} on {spec.channels_in}x{spec.size}x{spec.size} KL latents, {spec.prediction}, batch "
        f"{batch_size}; best of {args.repeats} interleaved runs of {args.steps} steps.",
        "",
        "| what | seconds/step | images/s | vs precomputed |",
        "| --- | ---: | ---: | --- |",
        f"| base step, precomputed latents + text features (the `base` stage's path) | {pre_s:.3f} | "
        f"{batch_size / pre_s:,.0f} | - |",
        f"| base step, online: decode shards + KL-encode + encode captions | {online_s:.3f} | "
        f"{batch_size / online_s:,.0f} | {online_s / pre_s:.2f}x slower (precompute speedup {online_s / pre_s:.2f}x) |",
        "",
        f"Full-cascade sampling, {n} images in batches of {args.batch} (base {s.base.steps} steps at guidance "
        f"{s.base.guidance:g}, super-res {s.superres.steps} steps at guidance {s.superres.guidance:g}, "
        f"{cascade.resolution}px): DPM-Solver++ **{rates['dpm']:.2f} images/s**, DDIM {rates['ddim']:.2f} images/s "
        f"at the same steps ({rates['dpm'] / rates['ddim']:.2f}x: the network evaluations dominate, the solvers' "
        "own arithmetic is negligible).",
        "",
        f"Pixel super-res from real low-res inputs ({args.sr_images} test images downscaled to "
        f"{cascade.superres.spec.low_res} px, upsampled to {cascade.resolution} px, {s.superres.steps} steps, "
        f"augmentation level {s.aug_level:g}), PSNR against the originals:",
        "",
        "| upsampler | PSNR (dB) |",
        "| --- | ---: |",
        f"| bilinear (baseline) | {bilinear:.2f} |",
        *[f"| super-res model, thresholding {mode}{' (params)' if mode == s.superres.thresholding else ''} | "
          f"{value:.2f} |" for mode, value in by_mode.items()],
        "",
        f"### Masked vs diffusion family on `{cfg.profile}` (recorded stage metrics of both runs)",
        "",
        *side_by_side([family_rows("masked", args.masked_root), family_rows("diffusion", args.root)]),
        "",
    ]
    print(replace_section(args.out, "bench_diffusion", lines))


if __name__ == "__main__":
    main()
