"""The trained cascade's held-out check sampled in fp32 (as shipped) vs under bf16 autocast.

Answers "can sampling run in bf16 without moving the checker figures": the superres stage's own
check (components.compositional.check_held_out: held-out test prompts, default guidance and 0, one
seed set, exact checker) on the demo's cascade, once as shipped and once with the models and the
decoder under torch.autocast(bfloat16) on the CPU. bf16 changes rounding, so individual
samples differ; compare the figures with the spread between seed sets (Generators in the README).

    .venv/bin/python benchmarks/bench_sampler_precision.py --record
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402

SHOWN = ("single_colour_shape", "pair_overall", "overall", "colour", "shape", "count", "position")


def main() -> None:
    from components.cascades import checked_generate
    from components.compositional import check_held_out
    from components.superres import load_cascade
    from models.masked_transformer import load_generator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--profile", default=None)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/bench_sampler_precision"))
    p.add_argument("--record", type=Path, nargs="?", const=REPO / "benchmarks" / "RESULTS.md", default=None)
    args = p.parse_args()
    cfg = load_config(args.params, args.profile)
    cfg = replace(cfg, superres=replace(cfg.superres, eval_seed_sets=1))  # one seed set: the fixed seeds i
    art = args.artifacts
    superres = load_generator(art / "superres")
    cascade = load_cascade(cfg, art / "base", art / "tokenizer", superres_model=superres,
                           text_dim=superres.spec.text_dim)
    generate = checked_generate(cascade)  # on the CPU: the stage check feeds it host tensors
    rows = {}
    for label, bf16 in (("fp32 (shipped)", False), ("bf16 autocast", True)):
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            m = check_held_out(generate, cfg.superres, art / "features", art / "validate", args.scratch / label[:4])
        rows[label] = (m, time.perf_counter() - start)
        print(label, {c: round(m[f"checker_{c}"], 4) for c in SHOWN[:2]}, f"{rows[label][1]:.0f} s", flush=True)
    base_seconds = rows["fp32 (shipped)"][1]
    lines = ["## Cascade sampling in bf16 vs fp32: the held-out check (`bench_sampler_precision.py`)", "",
             f"The superres stage's check on the trained `{cfg.profile}` cascade ({cfg.superres.eval_prompts} held-out "
             f"test prompts, default sampling, seeds i, guidance default and 0), sampled as shipped and under bf16 "
             f"autocast on the CPU; {time.strftime('%Y-%m-%d')}; {machine()}.", "",
             "| sampling | " + " | ".join(SHOWN) + " | single g0 | pair g0 | seconds | speedup |",
             "| --- |" + " ---: |" * (len(SHOWN) + 4)]
    for label, (m, seconds) in rows.items():
        cells = [f"{100 * m[f'checker_{c}']:.1f}%" for c in SHOWN]
        cells += [f"{100 * m[f'checker_{c}_g0']:.1f}%" for c in SHOWN[:2]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {seconds:.0f} | {base_seconds / seconds:.2f}x |")
    lines.append("")
    print("\n".join(lines))
    if args.record:
        replace_section(args.record, "bench_sampler_precision", lines)


if __name__ == "__main__":
    main()
