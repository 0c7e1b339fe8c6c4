"""Super-res fidelity from *real* low-res maps: does the super-res model keep what the base map shows?

On the first --images held-out test images (artifacts/validate; unseen (colour, shape) pairs), each
image is downscaled to the base tokenizer's resolution and encoded into its low-res token map, then
read back by the exact checker at each of these stages:

    base tokenizer, 32 px      the map decoded by the base tokenizer (what the map shows)
    bicubic upsampling, 64 px  that decode resized: the baseline any super-res model must beat
    super-res model, 64 px     params' default super-res sampling from the map and the caption,
                               decoded by decoder_ft's decoder (artifacts/decoder_ft: the
                               finetuned one, or the tokenizer's own if that was better)
    super-res tokenizer, 64 px the real 64 px image's own codes through the same decoder (the ceiling)

Every --compare DIR adds a row for another super-res generator on the same maps and seeds (e.g.
one trained without `superres.model.cond_add`). --temperatures / --choice-temperatures /
--guidance add a row per combination for the params' model: a sampler grid, which belongs on
`--split val` (seen pairs: tuning never looks at the held-out test pairs). Seconds are super-res
sampling only.

    .venv/bin/python benchmarks/bench_superres.py [--images 256] [--compare DIR ...] [--out FILE]
    .venv/bin/python benchmarks/bench_superres.py --split val --temperatures 0.3,0.7,1 --guidance 0,1,2

Prints a Markdown table; with --out, rewrites its own section of FILE (benchmarks/RESULTS.md style).
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.compositional import checker_metrics, split_prompts  # noqa: E402
from components.config import load_config  # noqa: E402
from components.features import FeatureStore  # noqa: E402
from components.images import ShardImageDataset, to_uint8  # noqa: E402
from components.io import read_accepted  # noqa: E402
from components.superres import load_for_inference  # noqa: E402
from models.cascade import SUPERRES_SEED_OFFSET  # noqa: E402
from models.masked_transformer import load_generator  # noqa: E402
from models.sampling import decode  # noqa: E402

COLUMNS = ("overall", "single_colour_shape", "colour", "shape", "count", "position")


def real_images(artifacts: Path, keys: list[str], resolution: int) -> torch.Tensor:
    """The accepted images by key, [B,3,R,R] in [-1,1]."""
    accepted = read_accepted(artifacts / "validate", ["key", "shard", "image_member", "sha256", "split"])
    accepted = accepted.set_index("key").loc[keys].reset_index()
    dataset = ShardImageDataset(artifacts / "data", accepted, resolution)
    return torch.stack([dataset[i] for i in range(len(keys))])


def sample_superres(model, text, mask, low, settings, batch: int) -> tuple[torch.Tensor, float]:
    """High-res token maps [B,N] from the low-res maps [B,M]; seeds as in the cascade. (tokens, seconds)"""
    out, start = [], time.perf_counter()
    for i in range(0, len(low), batch):
        seeds = [SUPERRES_SEED_OFFSET + j for j in range(i, min(i + batch, len(low)))]
        out.append(decode(model, text[i:i + batch], mask[i:i + batch], settings, seeds, cond_tokens=low[i:i + batch]))
    return torch.cat(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another super-res generator directory to check on the same maps")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--temperatures", default=None, help="comma-separated sampler grid (default: params')")
    parser.add_argument("--choice-temperatures", default=None, help="comma-separated (default: params')")
    parser.add_argument("--guidance", default=None, help="comma-separated (default: params')")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.params, profile=args.profile)
    art = args.artifacts
    cascade = load_for_inference(cfg, art / "base", art / "superres", art / "tokenizer", art / "decoder_ft")
    prompts = split_prompts(art / "validate", args.split, args.images)
    if not len(prompts):
        sys.exit(f"bench_superres: no {args.split} items with scenes under {art / 'validate'} (needs the built-in data)")
    text, mask = FeatureStore.open(art / "features").lookup(prompts.keys)
    low_res, high_res = cfg.tokenizer.base.resolution, cfg.tokenizer.superres.resolution
    x = real_images(art, prompts.keys, high_res)  # [B,3,64,64]
    settings = cascade.settings.superres

    def check(images: torch.Tensor) -> dict:
        return checker_metrics(to_uint8(images), prompts.scenes)

    rows = {}
    with torch.no_grad():
        base_tok = cascade.base_tokenizer
        low = base_tok.encode(F.interpolate(x, size=(low_res, low_res), mode="area")).flatten(1)  # [B,M]
        g = base_tok.spec.grid
        low_pixels = base_tok.decode(low.view(-1, g, g)).clamp(-1, 1)  # [B,3,32,32]
        rows[f"base tokenizer, {low_res} px (what the map shows)"] = (check(low_pixels), None)
        upsampled = F.interpolate(low_pixels, size=(high_res, high_res), mode="bicubic", align_corners=False)
        rows[f"bicubic upsampling of that, {high_res} px (baseline)"] = (check(upsampled.clamp(-1, 1)), None)
        models = [("super-res model (params)", cascade.superres, settings)]
        models += [(f"super-res model {d}", load_generator(d), settings) for d in args.compare]

        def values(option: str | None, default: float) -> list[float]:
            return [float(v) for v in option.split(",")] if option else [default]

        grid = [settings.replace(temperature=t, choice_temperature=c, guidance=g)
                for t in values(args.temperatures, settings.temperature)
                for c in values(args.choice_temperatures, settings.choice_temperature)
                for g in values(args.guidance, settings.guidance)]
        models += [(f"super-res model, temperature {v.temperature:g}, choice {v.choice_temperature:g}, guidance "
                    f"{v.guidance:g}", cascade.superres, v) for v in grid if v != settings]
        for name, model, sampler in models:
            tokens, seconds = sample_superres(model, text, mask, low, sampler, args.batch)
            cond_add = "cond_add" if model.spec.cond_add else "no cond_add"
            rows[f"{name}, {cond_add}, {high_res} px"] = (check(cascade.decode_tokens(tokens)), seconds)
        ceiling = cascade.decode_tokens(cascade.decoder.encode(x).flatten(1))
        rows[f"super-res tokenizer + decoder_ft's decoder, {high_res} px (ceiling)"] = (check(ceiling), None)

    lines = ["## Super-res fidelity from real low-res maps (`bench_superres.py`"
             + ("" if args.split == "test" else f" --split {args.split}") + ")", "",
             f"Super-res fidelity from real low-res maps: {len(prompts)} "
             + ("held-out test" if args.split == "test" else "val (seen-pair)")
             + f" images, super-res sampling {settings.steps} steps, params' temperature {settings.temperature:g}, "
             f"choice temperature {settings.choice_temperature:g}, guidance {settings.guidance:g} "
             f"({dt.date.today().isoformat()}; {machine()}).", "",
             "| stage | " + " | ".join(COLUMNS) + " | sampling s |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for name, (metrics, seconds) in rows.items():
        cells = [f"{100 * metrics[c]:.1f}%" if c in metrics else "-" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if seconds is None else f'{seconds:.1f}'} |")
    print("\n".join(lines))
    if args.out:
        replace_section(args.out, "bench_superres" + ("" if args.split == "test" else f"_{args.split}"), lines)


if __name__ == "__main__":
    main()
