"""Base-model sampler settings on val: the grid that chose `base.sample`, against a baseline setting.

The trained base model alone (artifacts/base), decoded by the base tokenizer, on the first --prompts
val prompts (seen (colour, shape) pairs: tuning never looks at the held-out test pairs). Every
setting in steps x temperature x guidance samples each prompt once per seed set (seed i, then
--seed-stride + i, ...) and the exact checker reads the images; a row is the mean over the seed
sets. The baseline (--baseline STEPS,TEMPERATURE,GUIDANCE; the defaults before this grid chose
new ones) is always in the grid, so the ratio is measured in the same run. Rows are sorted by
(single + pair) / 2, the issue's two headline figures.

    .venv/bin/python benchmarks/bench_sampler.py [--steps 12,24] [--temperatures 0.4,0.7,1.0]
        [--guidance 0.5,1,1.5,2] [--seed-sets 2] [--baseline 12,0.7,2] [--out benchmarks/RESULTS.md]
        [--section NAME]

About 10 min on 2 CPU cores with the default grid. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import asdict
from itertools import product
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.base import base_generate  # noqa: E402
from components.compositional import sample_and_check, split_prompts  # noqa: E402
from components.config import load_config  # noqa: E402
from components.features import FeatureStore  # noqa: E402
from models.masked_transformer import load_generator  # noqa: E402
from models.sampling import SamplerSettings  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402

COLUMNS = ("single_colour_shape", "pair_overall", "overall", "colour", "shape", "count", "position")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--steps", default="12,24")
    parser.add_argument("--temperatures", default="0.4,0.7,1.0")
    parser.add_argument("--guidance", default="0.5,1,1.5,2")
    parser.add_argument("--seed-sets", type=int, default=2)
    parser.add_argument("--seed-stride", type=int, default=1000)
    parser.add_argument("--baseline", default="12,0.7,2", help="STEPS,TEMPERATURE,GUIDANCE")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--section", default=None,
                        help="with --out, write a section of this name (heading suffix) instead of the default one")
    args = parser.parse_args()

    cfg = load_config(args.params, profile=args.profile)
    art = args.artifacts
    prompts = split_prompts(art / "validate", "val", args.prompts)
    if not len(prompts):
        sys.exit(f"bench_sampler: no val items with scenes under {art / 'validate'} (needs the built-in data)")
    model = load_generator(art / "base").eval()
    tokenizer = load_tokenizer(art / "tokenizer" / "base")
    features = FeatureStore.open(art / "features")
    default = SamplerSettings(**asdict(cfg.base.sample))
    base_steps, base_temperature, base_guidance = floats(args.baseline)
    steps = sorted({int(s) for s in floats(args.steps)} | {int(base_steps)})
    temperatures = sorted(set(floats(args.temperatures)) | {base_temperature})
    scales = sorted(set(floats(args.guidance)) | {base_guidance})

    results: dict[tuple[int, float, float], list[dict]] = {}
    seconds: dict[tuple[int, float], float] = {}
    for n_steps, temperature in product(steps, temperatures):
        settings = default.replace(steps=n_steps, temperature=temperature)
        start = time.perf_counter()
        for seed_set in range(args.seed_sets):
            generate = base_generate(model, tokenizer, settings, seed_offset=seed_set * args.seed_stride)
            by_guidance, _ = sample_and_check(generate, prompts, features, scales)
            for guidance, metrics in by_guidance.items():
                results.setdefault((n_steps, temperature, guidance), []).append(metrics)
        seconds[(n_steps, temperature)] = time.perf_counter() - start
        print(f"steps {n_steps} temperature {temperature:g}: {seconds[(n_steps, temperature)]:.0f} s", flush=True)

    mean = {k: {c: float(np.mean([m[c] for m in v])) for c in COLUMNS} for k, v in results.items()}

    def headline(m: dict) -> float:
        return (m["single_colour_shape"] + m["pair_overall"]) / 2

    baseline_key = (int(base_steps), base_temperature, base_guidance)
    baseline = mean[baseline_key]
    chosen = (default.steps, default.temperature, default.guidance)
    images_per_s = {k: len(prompts) * args.seed_sets * len(scales) / s for k, s in seconds.items()}
    title = f" (`--section {args.section}`)" if args.section else ""
    lines = [f"## Base sampler settings on val (`bench_sampler.py`){title}", "",
             f"The base model alone on {len(prompts)} val prompts (seen pairs), {args.seed_sets} seed sets per "
             f"setting (seeds i + {args.seed_stride} k), checker on base-tokenizer decodes; "
             f"{dt.date.today().isoformat()}; {machine()}. Baseline: {int(base_steps)} steps, temperature "
             f"{base_temperature:g}, guidance {base_guidance:g}. Params' default (`base.sample`): {chosen[0]} steps, "
             f"temperature {chosen[1]:g}, guidance {chosen[2]:g}. Sorted by (single + pair) / 2.", "",
             "| steps | temperature | guidance | single | pair | overall | colour | shape | count | position "
             "| (single + pair) / 2 | vs baseline | images/s |",
             "| ---: | ---: | ---: |" + " ---: |" * 10]
    for key, m in sorted(mean.items(), key=lambda kv: -headline(kv[1])):
        tag = " (baseline)" if key == baseline_key else " (default)" if key == chosen else ""
        cells = " | ".join(f"{100 * m[c]:.1f}%" for c in COLUMNS)
        lines.append(f"| {key[0]}{tag} | {key[1]:g} | {key[2]:g} | {cells} | {100 * headline(m):.1f}% "
                     f"| {headline(m) / headline(baseline):.2f}x | {images_per_s[key[:2]]:.1f} |")
    lines += ["", "images/s: all guidance scales of one steps x temperature setting together (checker included)."]
    print("\n".join(lines))
    if args.out:
        replace_section(args.out, "bench_sampler" + (f"_{args.section}" if args.section else ""), lines)


if __name__ == "__main__":
    main()
