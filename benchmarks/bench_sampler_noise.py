"""Where the masked sampler's time goes on a GPU: the seeded host-side Gumbel noise vs the model.

models.sampling.decode draws every image's Gumbel noise on the host from that image's own
torch.Generator (so a seed gives the same tokens on any device), then copies it to the device:
B x N x K floats per step for token sampling. For `base256` that is 2.1M floats per image per base
step and 8.4M per super-res step. This benchmark times decode for the profile's base and super-res
models (untrained weights: the same work per step; random text features) three ways:

    shipped        models.sampling.decode as it is (host noise, fp32 model)
    device noise   the same decode with the noise drawn on the device (unseeded: timing only)
    + bf16         device noise and the model under bf16 autocast

    python benchmarks/bench_sampler_noise.py --profile base256 --device cuda --batch 32 --record
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_scaling import generator_spec  # noqa: E402
from benchmarks.common import machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402


def device_gumbel(shape, generators, device):
    """Gumbel(0, 1) noise [B, *shape] drawn on the device (ignores the per-image generators)."""
    u = torch.rand((len(generators), *shape), device=device)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def timed_decode(model, settings, batch: int, device, cond_tokens=None) -> float:
    import models.sampling as sampling

    s = model.spec
    text = torch.randn(batch, s.text_length, s.text_dim, device=device)
    mask = torch.ones(batch, s.text_length, dtype=torch.bool, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    sampling.decode(model, text, mask, settings, list(range(batch)), cond_tokens=cond_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    import models.sampling as sampling
    from models.masked_transformer import MaskedTransformer
    from models.sampling import SamplerSettings

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--profile", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=384, help="the text encoder's width (MiniLM: 384)")
    p.add_argument("--record", type=Path, nargs="?", const=REPO / "benchmarks" / "RESULTS.md", default=None)
    args = p.parse_args()
    cfg = load_config(args.params, args.profile)
    device = torch.device(args.device)
    torch.manual_seed(0)
    models = {w: MaskedTransformer(generator_spec(cfg, w, args.text_dim)).eval().to(device) for w in ("base", "superres")}
    sr = models["superres"].spec  # the low-res map it is conditioned on: [B, cond_grid^2] base tokens
    cond = torch.randint(0, sr.cond_codebook_size, (args.batch, sr.cond_grid * sr.cond_grid), device=device)
    shipped_gumbel = sampling._gumbel
    rows = []
    for label, noise_on_device, bf16 in (("shipped", False, False), ("device noise", True, False),
                                         ("device noise + bf16", True, True)):
        sampling._gumbel = device_gumbel if noise_on_device else shipped_gumbel
        seconds = {}
        for which, model in models.items():
            settings = SamplerSettings(**asdict(getattr(cfg, which).sample))
            c = cond if which == "superres" else None
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                timed_decode(model, settings.replace(steps=1), 2, device, None if c is None else c[:2])  # warm-up
                seconds[which] = timed_decode(model, settings, args.batch, device, c)
        rows.append((label, seconds))
        print(label, {k: round(v, 2) for k, v in seconds.items()}, flush=True)
    sampling._gumbel = shipped_gumbel
    base0, sr0 = rows[0][1]["base"], rows[0][1]["superres"]
    lines = ["## Masked sampler on a GPU: host-side seeded noise vs the model (`bench_sampler_noise.py`)", "",
             f"Profile `{cfg.profile}`, untrained models (base {cfg.base.model.depth} x {cfg.base.model.width}, "
             f"super-res {cfg.superres.model.depth} x {cfg.superres.model.width}), random text features, batch "
             f"{args.batch}, the profile's sampler settings (base {cfg.base.sample.steps} steps, super-res "
             f"{cfg.superres.sample.steps}), one timed run each after a 1-step warm-up; {time.strftime('%Y-%m-%d')}; "
             f"{machine()}.", "",
             "| decode | base s | super-res s | both s | images/s | speedup vs shipped |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, s in rows:
        both = s["base"] + s["superres"]
        lines.append(f"| {label} | {s['base']:.2f} | {s['superres']:.2f} | {both:.2f} | {args.batch / both:.2f} | "
                     f"{(base0 + sr0) / both:.1f}x |")
    lines.append("")
    print("\n".join(lines))
    if args.record:
        replace_section(args.record, f"bench_sampler_noise_{cfg.profile}", lines)


if __name__ == "__main__":
    main()
