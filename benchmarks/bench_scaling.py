"""Derived training cost of a profile's cascade (default `base256`): FLOPs, per-GPU throughput,
GPU-hours and cost per stage, and the data-loading / text-encoding / all-reduce budgets.

Nothing here is a GPU measurement unless `--device cuda` was given: the FLOP counts are exact
(torch.utils.flop_counter on the stages' own models and training steps) and every throughput,
GPU-hour and dollar figure is derived from them by the formulas below with the stated peak
FLOP/s, MFU, bandwidth and price assumptions (all CLI options, recorded in the JSON).

What is counted, and how (on CPU, real tensors, small sizes, then extrapolated exactly):
  models      built with the stages' own builders: components.tokenizer.spec_for + its Lightning
              module (tokenizer + PatchDiscriminator), components.generator.spec_for + its module
              (tokens/features metadata from params: no artifacts needed), models.tokenizer.
              with_larger_decoder + components.decoder_ft's module, components.evaluator's module.
  train step  one call of the stage module's own `training_step` + `loss.backward()`, at batch 1
              (VQGAN, decoder: per-image losses) or 2 (evaluator: a contrastive loss needs two;
              generators). FLOPs are linear in the batch; reported per image.
  scaling     transformers: counted at depth 1 and 2 (super-res also cond_depth 2) and extended
              linearly to the configured depth (identical blocks: exact). Conv models: counted
              at resolutions 32, 48, 64 and extended per op to the configured resolution: convs,
              matmuls and the patch discriminator's (R/8 - k)^2 maps are quadratics in R, so the
              3-point fit is exact; attention scores scale as R^4 (N = (R/f)^2 tokens).
  attention   FlopCounterMode has no formula for CPU SDPA (aten._scaled_dot_product_flash_
              attention_for_cpu); the script registers torch's own sdpa formulas for it.
  not counted elementwise ops, norms, softmax, the optimizer, EMA: the usual MFU convention.
  The VQGAN's adversarial term switches on at train.disc_start; both step costs are counted
  and weighted by the steps before and after.

Derived, per stage (F = training FLOPs per image, P = peak bf16 dense FLOP/s, m = MFU, W = GPUs):
  train.batch_size is the global batch: components.training.per_process_batch splits it evenly over
  devices x nodes (process_grid: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE under a TrainJob)
  images/s per accelerator = P * m / F
  images seen = steps * train.batch_size
  accelerator-hours = images seen * F / (P * m) / 3600;  cost = hours * price per hour
  all-reduce per step = 2 (W-1)/W * trainable params * grad bytes / bandwidth
              (NVLink per GPU within a node; the node's NICs when the stage spans nodes)
  step compute = (train.batch_size / W) * F / (P * m)
  base on 1, 2, 4 nodes (fixed global batch): step time between forward + max(backward, all-reduce)
  (DDP's buckets all-reduced during the backward, backward = 2/3 of the compute) and
  compute + all-reduce (no overlap); wall h = steps * step / 3600, GPU-hours = wall h * W

Measured in the same run (CPU unless --device cuda): a few base-generator training steps at the
configured width and a reduced depth, as a plain PyTorch loop and through the stage's own module
(training_step + its configure_optimizers), their achieved FLOP/s against a matmul peak measured
in the same process (the sanity check of the FLOP count); image bytes and decode time of 256 px
PNG/JPEG (the shapes data, and one natural photo shipped with matplotlib, if installed).

    .venv/bin/python benchmarks/bench_scaling.py --out /tmp/scaling.json
    .venv/bin/python benchmarks/bench_scaling.py --record          # + its section of RESULTS.md
    .venv/bin/python benchmarks/bench_scaling.py --device cuda      # on a GPU: measured MFU

One to two minutes on 2 CPU cores (about 150 s of CPU time), most of it counting FLOPs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402
from components.training import per_process_batch  # noqa: E402

COUNT_RESOLUTIONS = (32, 48, 64)
T5_XXL_PARAMS = 4.6e9  # seed 002 (Imagen): "T5-XXL (4.6B parameters)"; Muse (seed 004) uses its 4096-d embeddings
T5_XXL_DIM = 4096


# --- FLOP counting ------------------------------------------------------------------------------

def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd})


def count(fn) -> dict[str, int]:
    """FLOPs by aten op of one call of fn()."""
    fc = flop_counter()
    with fc:
        fn()
    return {str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}


def total(counts: dict[str, int]) -> int:
    return sum(counts.values())


def lagrange(xs: list[float], ys: list[float], x: float) -> float:
    out = 0.0
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        term = float(yi)
        for j, xj in enumerate(xs):
            if j != i:
                term *= (x - xj) / (xi - xj)
        out += term
    return out


def to_resolution(by_r: dict[int, dict[str, int]], target: int) -> float:
    """Per op: attention scores x (target/R)^4 from the largest R; everything else the exact
    quadratic in R through the three counted resolutions."""
    rs = sorted(by_r)
    flops = 0.0
    for op in sorted(set().union(*by_r.values())):
        ys = [by_r[r].get(op, 0) for r in rs]
        flops += ys[-1] * (target / rs[-1]) ** 4 if "attention" in op else lagrange(rs, ys, target)
    return flops


def to_depth(f1: float, f2: float, depth: int) -> float:
    return f1 + (depth - 1) * (f2 - f1)


def params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --- the stages' models ---------------------------------------------------------------------------

def quiet() -> None:
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*self.trainer.*")
    import logging

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.ERROR)


def tokenizer_counts(cfg, which: str) -> dict:
    """VQGAN training step (GAN off / on) and encode (tokens stage), per image."""
    from components import tokenizer as stage

    t, out = cfg.tokenizer.train_for(which), {}
    full = stage.spec_for(cfg.tokenizer, which)
    by = {"train": {}, "train_gan": {}, "encode": {}}
    module = None
    for r in COUNT_RESOLUTIONS:
        spec = replace(full, resolution=r)
        images = torch.rand(1, 3, r, r) * 2 - 1
        for key, disc_start in (("train", 10**12), ("train_gan", 0)):
            torch.manual_seed(0)
            module = stage._lightning_module()(spec.to_dict(), asdict(replace(t, disc_start=disc_start)),
                                               cfg.tokenizer.perceptual.weights, cfg.tokenizer.perceptual.weight)
            by[key][r] = count(lambda: module.training_step(images, 0).backward())
        with torch.no_grad():
            by["encode"][r] = count(lambda: module.tokenizer.encode(images))
    R = full.resolution
    out = {k: to_resolution(v, R) for k, v in by.items()}
    gan_steps = max(0, t.steps - t.disc_start)
    out["train_mean"] = (min(t.disc_start, t.steps) * out["train"] + gan_steps * out["train_gan"]) / t.steps
    out.update(params=params(module.tokenizer), disc_params=params(module.discriminator),
               trainable=params(module.tokenizer) + params(module.discriminator), resolution=R,
               grid=full.grid, codebook=full.codebook_size, gan_steps=gan_steps,
               at_count_resolutions={k: {r: total(c) for r, c in v.items()} for k, v in by.items()})
    return out


def decoder_counts(cfg) -> dict:
    """decoder_ft training step (frozen codes -> larger decoder) and decode (evaluate), per image."""
    from components import decoder_ft as stage
    from components import tokenizer as tok_stage
    from models.tokenizer import ImageTokenizer, with_larger_decoder

    dft = cfg.decoder_ft
    full = tok_stage.spec_for(cfg.tokenizer, "superres")
    by = {"train": {}, "decode": {}}
    for r in COUNT_RESOLUTIONS:
        torch.manual_seed(0)
        model = with_larger_decoder(ImageTokenizer(replace(full, resolution=r)), tuple(dft.channels), dft.layers_per_block)
        module = stage._lightning_module()(model, asdict(dft.train))
        g = r // full.downsample
        codes = torch.randint(0, full.codebook_size, (1, g, g))
        images = torch.rand(1, 3, r, r) * 2 - 1
        by["train"][r] = count(lambda: module.training_step((codes, images), 0).backward())
        with torch.no_grad():
            by["decode"][r] = count(lambda: model.decode(codes))
    out = {k: to_resolution(v, full.resolution) for k, v in by.items()}
    out.update(params=params(model), trainable=params(model, trainable_only=True), resolution=full.resolution,
               at_count_resolutions={k: {r: total(c) for r, c in v.items()} for k, v in by.items()})
    return out


def evaluator_counts(cfg, text_dim: int, text_len: int) -> dict:
    from components import evaluator as stage
    from models.evaluator import EvaluatorSpec

    ev, B = cfg.evaluator, 2
    by = {"train": {}, "score": {}}
    for r in COUNT_RESOLUTIONS:
        torch.manual_seed(0)
        spec = EvaluatorSpec(resolution=r, channels=tuple(ev.channels), embed_dim=ev.embed_dim, text_dim=text_dim)
        module = stage._lightning_module()(spec.to_dict(), asdict(ev.train))
        batch = {"images": torch.rand(B, 3, r, r), "text": torch.randn(B, text_len, text_dim),
                 "text_mask": torch.ones(B, text_len, dtype=torch.bool), "caption_ids": torch.arange(B)}
        by["train"][r] = {k: v / B for k, v in count(lambda: module.training_step(batch, 0).backward()).items()}
        with torch.no_grad():
            by["score"][r] = {k: v / B for k, v in count(lambda: module.model.image_features(batch["images"])).items()}
    out = {k: to_resolution(v, ev.resolution) for k, v in by.items()}
    out.update(params=params(module.model), trainable=params(module.model), resolution=ev.resolution,
               at_count_resolutions={k: {r: total(c) for r, c in v.items()} for k, v in by.items()})
    return out


def stubs(cfg, text_dim: int):
    """What components.generator.spec_for reads from the tokens and features stores, from params."""
    meta = {w: {"kind": cfg.tokenizer.kind, "codebook_size": getattr(cfg.tokenizer, w).codebook_size,
                "grid": getattr(cfg.tokenizer, w).resolution // getattr(cfg.tokenizer, w).downsample}
            for w in ("base", "superres")}
    return SimpleNamespace(meta=meta), SimpleNamespace(dim=text_dim, max_length=cfg.features.encoder.max_length)


def generator_spec(cfg, which: str, text_dim: int, depth: int | None = None, cond_depth: int | None = None):
    from components.generator import spec_for

    g = getattr(cfg, which)
    model = g.model
    if depth is not None:
        model = replace(model, depth=depth, cond_depth=cond_depth if which == "superres" else 0)
    tokens, features = stubs(cfg, text_dim)
    return spec_for(replace(g, model=model), tokens, features, which)


def generator_batch(spec, B: int, device="cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, spec.codebook_size, (B, spec.n_tokens), generator=g),
             "text": torch.randn(B, spec.text_length, spec.text_dim, generator=g),
             "text_mask": torch.ones(B, spec.text_length, dtype=torch.bool)}
    if spec.is_superres:
        batch["cond_tokens"] = torch.randint(0, spec.cond_codebook_size, (B, spec.cond_grid ** 2), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def generator_counts(cfg, which: str, text_dim: int) -> dict:
    """Training step and one guided sampling step (cond + uncond = batch 2), per image."""
    from components.generator import _lightning_module
    from models.masked_transformer import MaskedTransformer

    g, B = getattr(cfg, which), 2
    points = [(1, 1), (2, 1)] + ([(1, 2)] if which == "superres" else [])
    train, sample = {}, {}
    for d, c in points:
        torch.manual_seed(0)
        spec = generator_spec(cfg, which, text_dim, d, c)
        module = _lightning_module()(spec.to_dict(), asdict(g.train), which)
        batch = generator_batch(spec, B)
        train[(d, c)] = total(count(lambda: module.training_step(batch, 0).backward())) / B
        with torch.no_grad():
            sample[(d, c)] = total(count(lambda: module.model(batch["tokens"], batch["text"], batch["text_mask"],
                                                              batch.get("cond_tokens"))))  # batch 2 = 1 guided image

    def extend(f: dict) -> float:
        out = to_depth(f[(1, 1)], f[(2, 1)], g.model.depth)
        if which == "superres":
            out += (g.model.cond_depth - 1) * (f[(1, 2)] - f[(1, 1)])
        return out

    full = generator_spec(cfg, which, text_dim)
    with torch.device("meta"):
        n = params(MaskedTransformer(full))
    return {"train": extend(train), "sample_step": extend(sample), "params": n, "trainable": n,
            "tokens": full.n_tokens, "context": 1 + full.text_length + (full.cond_grid ** 2 if full.is_superres else 0),
            "at_count_depths": {f"depth {d}, cond_depth {c}": v for (d, c), v in train.items()}}


def text_encoder_counts(cfg) -> dict:
    from models.text_encoder import FrozenTextEncoder

    enc = cfg.features.encoder
    start = time.perf_counter()
    encoder = FrozenTextEncoder.from_spec(enc.kind, enc.path, enc.max_length)
    load_s = time.perf_counter() - start
    L, B = enc.max_length, 2
    ids = torch.randint(1000, 2000, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    flops = total(count(lambda: encoder._hidden_states(ids, mask))) / B
    return {"kind": enc.kind, "max_length": L, "dim": encoder.dim, "params": params(encoder.model),
            "flops_per_caption": flops, "dtype": enc.dtype, "load_s": load_s}


# --- measured on this machine ---------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device) -> float:
    """Achieved FLOP/s of a large square matmul: fp32 on CPU, bf16 on GPU (best of 5)."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def time_base_steps(cfg, text_dim: int, depth: int, batch: int, steps: int, device: torch.device) -> dict:
    """Base-generator training steps: a plain PyTorch loop vs the stage's module (best of 2 runs each)."""
    from components.generator import _lightning_module, draw_masks
    from models.masked_transformer import MaskedTransformer, masked_token_loss

    g = cfg.base
    spec = generator_spec(cfg, "base", text_dim, depth, 0)
    data = generator_batch(spec, batch, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    t = g.train

    torch.manual_seed(0)
    model = MaskedTransformer(spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    rng = torch.Generator().manual_seed(0)

    def plain_step() -> None:
        tokens = data["tokens"]
        masked, dropped = draw_masks(rng, *tokens.shape, t.text_dropout)
        masked, dropped = masked.to(device), dropped.to(device)
        with autocast:
            logits = model(tokens.masked_fill(masked, spec.mask_id), data["text"], data["text_mask"] & ~dropped[:, None])
            loss = masked_token_loss(logits.float(), tokens, masked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()

    torch.manual_seed(0)
    module = _lightning_module()(spec.to_dict(), asdict(t), "base").to(device)
    configured = module.configure_optimizers()
    stage_opt, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]

    def stage_step() -> None:
        with autocast:
            loss = module.training_step(data, 0)
        stage_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), t.grad_clip)
        stage_opt.step()
        schedule.step()

    flops = total(count(lambda: module.training_step(data, 0).backward()))
    module.zero_grad(set_to_none=True)

    def timed(step) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return (time.perf_counter() - start) / steps

    plain_step(), stage_step()  # warm-up
    plain_s, stage_s = [], []
    for _ in range(2):  # interleaved
        plain_s.append(timed(plain_step))
        stage_s.append(timed(stage_step))
    p, s = min(plain_s), min(stage_s)
    return {"depth": depth, "width": spec.width, "batch": batch, "steps": steps, "flops_per_step": flops,
            "params": params(model), "plain_s_per_step": p, "stage_s_per_step": s,
            "plain_flops_per_s": flops / p, "stage_flops_per_s": flops / s,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}


def image_bytes(size: int, n: int = 32) -> dict:
    """Encoded bytes and decode time per image: the shapes data (as the data stage writes it) and one
    natural photo (matplotlib's sample grace_hopper.jpg, centre-cropped and resized), PNG and JPEG q95."""
    from PIL import Image

    from models import shapes

    def measure(images: list) -> dict:
        out = {}
        for fmt, kwargs in (("png", {}), ("jpeg", {"quality": 95})):
            blobs = []
            for im in images:
                buf = io.BytesIO()
                im.save(buf, format=fmt.upper(), **kwargs)
                blobs.append(buf.getvalue())
            decode = []
            for _ in range(3):
                start = time.perf_counter()
                for b in blobs:
                    with Image.open(io.BytesIO(b)) as im:
                        np.asarray(im.convert("RGB"))
                decode.append((time.perf_counter() - start) / len(blobs))
            out[fmt] = {"bytes": float(np.mean([len(b) for b in blobs])), "decode_s": min(decode)}
        return out

    train_pairs, _ = shapes.split_pairs(0, 0.2)
    scenes = [shapes.sample_scene(shapes.scene_rng(0, "train", i), sorted(train_pairs), 3) for i in range(n)]
    result = {"raw_rgb_bytes": size * size * 3, "shapes": measure([shapes.render(s, size) for s in scenes]),
              "shapes_n": n}
    try:
        import matplotlib.cbook

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
            w, h = im.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            photo = im.convert("RGB").crop(box).resize((size, size), Image.BICUBIC)
        result["photo"] = measure([photo])
    except Exception as err:  # matplotlib absent or without sample data: the photo row is skipped
        result["photo_error"] = f"{type(err).__name__}: {err}"
    return result


# --- derivation -----------------------------------------------------------------------------------

def placement(cfg, stage: str, devices: int) -> tuple[int, int]:
    """(GPUs per node, nodes) for a stage: params' kubeflow placement when present, else train.devices."""
    kf = getattr(cfg, "kubeflow", None)
    p = getattr(getattr(kf, "stages", None), stage, None) if kf is not None else None
    if p is None:
        return max(devices, 1), 1
    return max(p.accelerators, 1), max(p.nodes, 1)


def allreduce_s(grad_bytes: float, gpn: int, nodes: int, a, internode_gbps: float | None = None) -> tuple[float, str]:
    """Ring all-reduce of the gradients: over NVLink within one node, over the nodes' NICs across nodes."""
    world = gpn * nodes
    if nodes > 1:
        gbps = internode_gbps or a.internode_gbps
        return 2 * (world - 1) / world * grad_bytes / (gbps / 8 * 1e9), f"{gbps:g} Gbit/s per node (inter-node)"
    if world > 1:
        return 2 * (world - 1) / world * grad_bytes / (a.nvlink_gbytes * 1e9), f"{a.nvlink_gbytes:g} GB/s per GPU (NVLink)"
    return 0.0, "none (1 GPU)"


def base_nodes(row: dict, h100: float, a) -> dict:
    """The base stage on 1, 2 and 4 nodes of 8 H100: at its configured global batch (same steps), and
    4 nodes vs 1 at larger global batches with the steps cut to keep the images seen."""
    F, grad, seen = row["flops_per_image"], row["allreduce"]["grad_bytes"], row["images_seen"]

    def case(batch: int, nodes: int, steps: int) -> dict:
        world = 8 * nodes
        per_gpu = per_process_batch("base", batch, world)
        compute = per_gpu * F / h100
        out = {"batch": batch, "nodes": nodes, "gpus": world, "per_gpu_batch": per_gpu, "steps": steps,
               "compute_s": compute}
        for key, gbps in (("", None), ("@200", 200.0)):
            ar, link = allreduce_s(grad, 8, nodes, a, gbps)
            overlap = compute / 3 + max(2 * compute / 3, ar)  # forward + max(backward, all-reduce)
            serial = compute + ar
            out.update({f"allreduce_s{key}": ar, f"step_s[overlap]{key}": overlap, f"step_s[serial]{key}": serial,
                        f"wall_h[overlap]{key}": steps * overlap / 3600, f"wall_h[serial]{key}": steps * serial / 3600,
                        f"gpu_h[overlap]{key}": steps * overlap / 3600 * world,
                        f"gpu_h[serial]{key}": steps * serial / 3600 * world})
            if not key:
                out["link"] = link
        return out

    at_batch = [case(row["batch"], n, row["steps"]) for n in (1, 2, 4)]
    larger = [case(b, n, seen // b) for b in (1024, 2048, 4096, 8192) for n in (1, 4)]
    return {"at_configured_batch": at_batch, "same_images_larger_batch": larger,
            "ideal_gpu_h": seen * F / h100 / 3600}


def derive(cfg, counts: dict, text: dict, images: dict, a) -> dict:
    acc = {"H100": (a.h100_tflops * 1e12, a.price_h100), "A100": (a.a100_tflops * 1e12, a.price_a100),
           "TPU v5e": (a.tpu_tflops * 1e12, a.price_tpu)}
    mfu = {"transformer": a.mfu_transformer, "conv": a.mfu_conv}
    b = cfg.data.builtin
    n_train, n_all = b.n_train, b.n_train + b.n_val + b.n_test
    feat_bytes = text["max_length"] * text["dim"] * {"float16": 2, "float32": 4}[text["dtype"]] + text["max_length"]
    tok = {w: counts[f"tokenizer_{w}"]["grid"] ** 2 * 2 for w in ("base", "superres")}  # uint16 per image
    img = images["photo"]["jpeg"] if "photo" in images else images["shapes"]["jpeg"]

    train_stages = [  # name, params stage, counts key, flops key, MFU class, bytes read per example, decodes an image
        ("tokenizer (base VQGAN + D)", "tokenizer", "tokenizer_base", "train_mean", "conv", img["bytes"], True),
        ("tokenizer (super-res VQGAN + D)", "tokenizer", "tokenizer_superres", "train_mean", "conv", img["bytes"], True),
        ("evaluator", "evaluator", "evaluator", "train", "conv", img["bytes"] + feat_bytes, True),
        ("base", "base", "base", "train", "transformer", tok["base"] + feat_bytes, False),
        ("superres", "superres", "superres", "train", "transformer", tok["superres"] + tok["base"] + feat_bytes, False),
        ("decoder_ft", "decoder_ft", "decoder_ft", "train", "conv", tok["superres"] + img["bytes"], True),
    ]
    rows = []
    for name, stage, key, fkey, kind, read_bytes, decodes in train_stages:
        c = counts[key]
        t = getattr(cfg, stage).train
        gpn, nodes = placement(cfg, stage, t.devices)
        world = gpn * nodes
        F = c[fkey]
        seen = t.steps * t.batch_size  # train.batch_size is the global batch
        row = {"stage": name, "params_stage": stage, "params": c["params"], "trainable": c["trainable"],
               "flops_per_image": F, "mfu_class": kind, "mfu": mfu[kind], "steps": t.steps, "batch": t.batch_size,
               "per_gpu_batch": per_process_batch(stage, t.batch_size, world), "images_seen": seen,
               "gpus_per_node": gpn, "nodes": nodes, "world": world, "read_bytes_per_image": read_bytes,
               "decodes_images": decodes}
        for label, (peak, price) in acc.items():
            ips = peak * mfu[kind] / F
            hours = seen / ips / 3600
            row[f"images_per_s[{label}]"] = ips
            row[f"hours[{label}]"] = hours
            row[f"cost[{label}]"] = hours * price
            row[f"wall_h[{label}]"] = hours / world
        # per-step compute vs all-reduce on H100 (the profile's pool)
        h100 = acc["H100"][0] * mfu[kind]
        grad = c["trainable"] * a.grad_bytes
        allreduce, link = allreduce_s(grad, gpn, nodes, a)
        step = row["per_gpu_batch"] * F / h100
        row["allreduce"] = {"grad_bytes": grad, "link": link, "seconds": allreduce,
                            "seconds_bf16_grads": allreduce * 2 / a.grad_bytes,
                            "step_compute_s": step, "ratio": allreduce / step}
        ips = row["images_per_s[H100]"]
        row["data"] = {"bytes_per_s_per_gpu": ips * read_bytes, "bytes_per_s_per_node": ips * read_bytes * gpn,
                       "decode_cores_per_gpu": ips * img["decode_s"] if decodes else 0.0}
        rows.append(row)

    # one-off passes whose cost grows with the dataset: text features, tokens, the evaluate sweep
    def inference(name: str, n: float, F: float, kind: str) -> dict:
        out = {"stage": name, "items": n, "flops_per_item": F, "mfu_class": kind}
        for label, (peak, price) in acc.items():
            hours = n * F / (peak * mfu[kind]) / 3600
            out[f"hours[{label}]"], out[f"cost[{label}]"] = hours, hours * price
        return out

    ev = cfg.evaluate
    scales = len(set(ev.guidance_scales) | {cfg.base.sample.guidance})

    def one_offs(n_items: int, n_test: int) -> list[dict]:
        per_scale = min(ev.prompts, n_test)
        n_checked = min(ev.checker_prompts, n_test) * ev.checker_seed_sets
        n_eval = scales * per_scale + n_checked
        per_image = (cfg.base.sample.steps * counts["base"]["sample_step"]
                     + cfg.superres.sample.steps * counts["superres"]["sample_step"]
                     + counts["decoder_ft"]["decode"] + counts["evaluator"]["score"])
        return [inference("features (text encoder, once per caption)", n_items, text["flops_per_caption"], "transformer"),
                inference("tokens (both encoders, once per image)", n_items,
                          counts["tokenizer_base"]["encode"] + counts["tokenizer_superres"]["encode"], "conv"),
                inference(f"evaluate ({scales} scales x {per_scale:,} + {n_checked:,} checker)",
                          n_eval, per_image, "transformer")]

    big = a.scale_to
    test_frac = b.n_test / n_all

    # text encoding: once per caption (the features stage) vs online in every step that reads text
    readers = [r for r in rows if r["params_stage"] in ("evaluator", "base", "superres")]
    peak_t = acc["H100"][0] * mfu["transformer"]
    base = next(r for r in rows if r["params_stage"] == "base")
    t5_bytes = text["max_length"] * T5_XXL_DIM * 2 + text["max_length"]
    text_rows = []
    for name, F, nbytes in ((f"{text['kind']} (configured, {text['params'] / 1e6:.0f} M)", text["flops_per_caption"], feat_bytes),
                            (f"T5-XXL ({T5_XXL_PARAMS / 1e9:.1f} B, Muse/Imagen)", 2 * T5_XXL_PARAMS * text["max_length"], t5_bytes)):
        row = {"encoder": name, "flops_per_caption": F, "share_of_base_step": F / base["flops_per_image"],
               "bytes_per_caption": nbytes, "read_MBps_per_gpu_base": base["images_per_s[H100]"] * nbytes / 1e6,
               "store_GB": {n_all: n_all * nbytes / 1e9, big: big * nbytes / 1e9},
               "cached_H100_h": {n_all: n_all * F / peak_t / 3600, big: big * F / peak_t / 3600}}
        row["online_H100_h"] = sum(r["images_seen"] for r in readers) * F / peak_t / 3600
        text_rows.append(row)

    totals = {"train": {label: {"hours": sum(r[f"hours[{label}]"] for r in rows),
                                "cost": sum(r[f"cost[{label}]"] for r in rows),
                                "wall_h": sum(r[f"wall_h[{label}]"] for r in rows)} for label in acc},
              "epochs_factor": big / n_all}
    return {"accelerators": {k: {"peak_flops": v[0], "price_per_hour": v[1]} for k, v in acc.items()},
            "mfu": mfu, "train": rows, "base_nodes": base_nodes(base, peak_t, a),
            "one_off": {"n": one_offs(n_all, b.n_test), "big": one_offs(big, int(big * test_frac))},
            "n_train": n_train, "n_all": n_all, "big": big, "text_encoding": text_rows, "totals": totals,
            "bytes": {"text_features_per_caption": feat_bytes, "tokens_base": tok["base"], "tokens_superres": tok["superres"],
                      "image_jpeg_used": img["bytes"], "image_decode_s_used": img["decode_s"],
                      "t5xxl_features_per_caption": text["max_length"] * T5_XXL_DIM * 2 + text["max_length"]},
            "text": {"flops_per_caption": text["flops_per_caption"],
                     "t5xxl_flops_per_caption": 2 * T5_XXL_PARAMS * text["max_length"]}}


# --- report ---------------------------------------------------------------------------------------

def g(x: float) -> str:
    """Human number: 3 significant figures with thousands separators."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{digits}f}"


def markdown(cfg, d: dict, counts: dict, text: dict, timing: dict, images: dict, a) -> list[str]:
    rows = d["train"]
    L = ["### Per stage: model, training FLOPs per image, derived throughput", "",
         "| stage | params (trainable) | train GFLOP / image | MFU (assumed) | images/s per H100 | per A100 | per TPU v5e chip |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        L.append(f"| {r['stage']} | {r['params'] / 1e6:,.1f} M ({r['trainable'] / 1e6:,.1f} M) | {r['flops_per_image'] / 1e9:,.1f} | "
                 f"{r['mfu']:.0%} | {g(r['images_per_s[H100]'])} | {g(r['images_per_s[A100]'])} | {g(r['images_per_s[TPU v5e]'])} |")
    L += ["", "### GPU-hours and cost (train.batch_size = global batch, split over the GPUs)", "",
          "| stage | GPUs | per-GPU batch | steps x global batch | images seen | epochs at "
          f"{d['n_train']:,} | H100-h | H100 $ | wall h (H100) | A100-h | A100 $ | v5e chip-h | v5e $ |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        seen = r["images_seen"]
        L.append(f"| {r['stage']} | {r['world']} | {r['per_gpu_batch']:,} | {r['steps']:,} x {r['batch']:,} | {seen / 1e6:,.1f} M | "
                 f"{g(seen / d['n_train'])} | {g(r['hours[H100]'])} | {g(r['cost[H100]'])} | {g(r['wall_h[H100]'])} | "
                 f"{g(r['hours[A100]'])} | {g(r['cost[A100]'])} | {g(r['hours[TPU v5e]'])} | {g(r['cost[TPU v5e]'])} |")
    tr = d["totals"]["train"]
    L.append(f"| **training total** | | | | | | **{g(tr['H100']['hours'])}** | **{g(tr['H100']['cost'])}** | "
             f"{g(tr['H100']['wall_h'])} | **{g(tr['A100']['hours'])}** | **{g(tr['A100']['cost'])}** | "
             f"**{g(tr['TPU v5e']['hours'])}** | **{g(tr['TPU v5e']['cost'])}** |")
    bn = d["base_nodes"]
    base = next(r for r in rows if r["params_stage"] == "base")

    def rng(c: dict, key: str, scale: float = 1.0, fmt=g, suffix: str = "") -> str:
        lo, hi = c[f"{key}[overlap]{suffix}"] * scale, c[f"{key}[serial]{suffix}"] * scale
        return f"{fmt(lo)} - {fmt(hi)}"

    L += ["", f"### base on 1, 2, 4 nodes of 8 H100 at its global batch {base['batch']:,} ({base['steps']:,} steps)", "",
          f"Inter-node {a.internode_gbps:g} Gbit/s per node, NVLink {a.nvlink_gbytes:g} GB/s per GPU within one node; "
          "ranges: DDP buckets all-reduced during the backward (forward + max(backward, all-reduce)) - no overlap "
          f"(compute + all-reduce). Ideal (no communication): {g(bn['ideal_gpu_h'])} GPU-h.", "",
          "| nodes | GPUs | per-GPU batch | compute ms / step | all-reduce ms / step | step ms | wall h | GPU-h | H100 $ | "
          "all-reduce ms at 200 Gbit/s | wall h at 200 Gbit/s |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in bn["at_configured_batch"]:
        L.append(f"| {c['nodes']} | {c['gpus']} | {c['per_gpu_batch']} | {c['compute_s'] * 1e3:,.1f} | {c['allreduce_s'] * 1e3:,.1f} | "
                 f"{rng(c, 'step_s', 1e3)} | {rng(c, 'wall_h')} | {rng(c, 'gpu_h')} | {rng(c, 'gpu_h', a.price_h100)} | "
                 f"{c['allreduce_s@200'] * 1e3:,.1f} | {rng(c, 'wall_h', suffix='@200')} |")
    L += ["", f"### base, 4 nodes vs 1 at larger global batches (steps cut to keep {base['images_seen'] / 1e6:,.0f} M images)", "",
          "| global batch | steps | nodes | per-GPU batch | compute ms | all-reduce ms | all-reduce / backward | wall h | GPU-h |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in bn["same_images_larger_batch"]:
        L.append(f"| {c['batch']:,} | {c['steps']:,} | {c['nodes']} | {c['per_gpu_batch']} | {c['compute_s'] * 1e3:,.1f} | "
                 f"{c['allreduce_s'] * 1e3:,.1f} | {c['allreduce_s'] / (2 * c['compute_s'] / 3):.2f} | {rng(c, 'wall_h')} | "
                 f"{rng(c, 'gpu_h')} |")
    for key, n in (("n", d["n_all"]), ("big", d["big"])):
        L += ["", f"### Passes that scale with the dataset ({n:,} images)", "",
              "| pass | items | GFLOP / item | H100-h | H100 $ | A100-h | A100 $ |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in d["one_off"][key]:
            L.append(f"| {r['stage']} | {r['items']:,.0f} | {r['flops_per_item'] / 1e9:,.2f} | {g(r['hours[H100]'])} | "
                     f"{g(r['cost[H100]'])} | {g(r['hours[A100]'])} | {g(r['cost[A100]'])} |")
    tt, f = d["totals"]["train"], d["totals"]["epochs_factor"]

    def one(key: str) -> tuple[float, float]:
        return sum(r["hours[H100]"] for r in d["one_off"][key]), sum(r["cost[H100]"] for r in d["one_off"][key])

    small, large = one("n"), one("big")
    L += ["", "### Totals by dataset size (H100 hours / $)", "",
          f"| | {d['n_all']:,} images ({d['n_train']:,} train; configured) | {d['big']:,} images, same steps | "
          f"{d['big']:,} images, same epochs (x{f:.1f}) |",
          "| --- | ---: | ---: | ---: |"]
    h, c = tt["H100"]["hours"], tt["H100"]["cost"]
    L.append(f"| training | {g(h)} h / ${g(c)} | {g(h)} h / ${g(c)} | {g(h * f)} h / ${g(c * f)} |")
    L.append(f"| features + tokens + evaluate | {g(small[0])} h / ${g(small[1])} | {g(large[0])} h / ${g(large[1])} | "
             f"{g(large[0])} h / ${g(large[1])} |")
    L += ["", "### Text encoding: cached once vs online every step (H100, transformer MFU)", "",
          "| encoder | GFLOP / caption | share of a base training step | bytes / caption cached | MB/s per GPU (base) | "
          f"store at {d['n_all']:,} / {d['big']:,} | encode once ({d['n_all']:,} / {d['big']:,}) | "
          "online in every evaluator+base+superres step |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in d["text_encoding"]:
        st, ca = list(r["store_GB"].values()), list(r["cached_H100_h"].values())
        L.append(f"| {r['encoder']} | {r['flops_per_caption'] / 1e9:,.1f} | {r['share_of_base_step']:.1%} | "
                 f"{r['bytes_per_caption']:,} | {r['read_MBps_per_gpu_base']:,.0f} | {g(st[0])} GB / {g(st[1])} GB | "
                 f"{g(ca[0])} h / {g(ca[1])} h | {g(r['online_H100_h'])} h |")
    L += ["", "### All-reduce vs step compute (H100, per step)", "",
          f"| stage | GPUs | grads all-reduced ({a.grad_bytes:g} B/param) | link | all-reduce ms | "
          "per-GPU batch | step compute ms | all-reduce / compute |",
          "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        x = r["allreduce"]
        L.append(f"| {r['stage']} | {r['world']} | {x['grad_bytes'] / 1e9:,.2f} GB | {x['link']} | {x['seconds'] * 1e3:,.1f} | "
                 f"{r['per_gpu_batch']} | {x['step_compute_s'] * 1e3:,.1f} | {x['ratio']:.2f} |")
    L += ["", "### Data read per GPU at the derived H100 rate", "",
          "| stage | bytes read / example | MB/s per GPU | MB/s per node | decode cores per GPU |",
          "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        x = r["data"]
        L.append(f"| {r['stage']} | {r['read_bytes_per_image']:,.0f} | {x['bytes_per_s_per_gpu'] / 1e6:,.1f} | "
                 f"{x['bytes_per_s_per_node'] / 1e6:,.0f} | {x['decode_cores_per_gpu']:.2f} |")
    by = d["bytes"]
    L += ["", "### Bytes per image", "", "| what | bytes |", "| --- | ---: |",
          f"| base tokens (uint16, {counts['tokenizer_base']['grid']}x{counts['tokenizer_base']['grid']}) | {by['tokens_base']:,} |",
          f"| super-res tokens (uint16, {counts['tokenizer_superres']['grid']}x{counts['tokenizer_superres']['grid']}) | {by['tokens_superres']:,} |",
          f"| text features ({text['kind']}, {text['max_length']} x {text['dim']} {text['dtype']} + mask) | {by['text_features_per_caption']:,} |",
          f"| text features if T5-XXL ({text['max_length']} x {T5_XXL_DIM} float16 + mask) | {by['t5xxl_features_per_caption']:,} |",
          f"| raw RGB {cfg.data.builtin.image_size} px | {images['raw_rgb_bytes']:,} |"]
    for src in ("shapes", "photo"):
        if src in images:
            for fmt in ("png", "jpeg"):
                m = images[src][fmt]
                L.append(f"| {src} {cfg.data.builtin.image_size} px {fmt.upper()}{' q95' if fmt == 'jpeg' else ''} "
                         f"(decode {m['decode_s'] * 1e3:.2f} ms) | {m['bytes']:,.0f} |")
    tm = timing
    L += ["", "### Measured: base-generator training step on this machine", "",
          f"Width {tm['width']}, depth {tm['depth']} (configured {cfg.base.model.depth}), batch {tm['batch']}, "
          f"{tm['precision']}, best of 2 x {tm['steps']} steps; {tm['flops_per_step'] / 1e9:,.1f} GFLOP counted per step; "
          f"matmul peak measured here {tm['matmul_peak'] / 1e9:,.1f} GFLOP/s.", "",
          "| loop | s / step | achieved GFLOP/s | of the matmul peak |", "| --- | ---: | ---: | ---: |",
          f"| plain PyTorch (model, masked CE, AdamW, clip) | {tm['plain_s_per_step']:.3f} | {tm['plain_flops_per_s'] / 1e9:,.1f} | "
          f"{tm['plain_flops_per_s'] / tm['matmul_peak']:.0%} |",
          f"| the stage's module (training_step + configure_optimizers) | {tm['stage_s_per_step']:.3f} | "
          f"{tm['stage_flops_per_s'] / 1e9:,.1f} | {tm['stage_flops_per_s'] / tm['matmul_peak']:.0%} |"]
    return L


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="base256")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--mfu-transformer", type=float, default=0.35, help="assumed MFU of the masked transformers")
    p.add_argument("--mfu-conv", type=float, default=0.25, help="assumed MFU of the conv nets (VQGAN, decoder, evaluator)")
    p.add_argument("--h100-tflops", type=float, default=989.0, help="H100 SXM bf16 dense peak")
    p.add_argument("--a100-tflops", type=float, default=312.0, help="A100 bf16 dense peak")
    p.add_argument("--tpu-tflops", type=float, default=197.0, help="TPU v5e bf16 peak per chip")
    p.add_argument("--price-h100", type=float, default=3.00, help="$/GPU-hour, assumed list price")
    p.add_argument("--price-a100", type=float, default=1.80, help="$/GPU-hour, assumed list price")
    p.add_argument("--price-tpu", type=float, default=1.20, help="$/chip-hour TPU v5e, assumed list price")
    p.add_argument("--internode-gbps", type=float, default=800.0,
                   help="Gbit/s per node for inter-node all-reduce (a3-highgpu-8g: 4 x 200 Gbit/s GPUDirect-TCPX NICs)")
    p.add_argument("--nvlink-gbytes", type=float, default=450.0, help="GB/s per GPU per direction within a node (H100 NVLink 4)")
    p.add_argument("--grad-bytes", type=float, default=4.0,
                   help="bytes per gradient all-reduced: 4 = fp32 (Lightning bf16-mixed + DDP, no comm hook), 2 = bf16")
    p.add_argument("--scale-to", type=int, default=10_000_000, help="second dataset size for the per-image passes")
    p.add_argument("--device", default="cpu", help="where the timed base steps run (cuda: full depth, bf16 autocast)")
    p.add_argument("--time-depth", type=int, default=None, help="base depth for the timed steps (default: 2 on CPU, full on GPU)")
    p.add_argument("--time-batch", type=int, default=None, help="batch for the timed steps (default: 4 on CPU, 64 on GPU)")
    p.add_argument("--time-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    p.add_argument("--record", action="store_true", help="rewrite this script's section of benchmarks/RESULTS.md")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    quiet()
    began = time.perf_counter()
    cfg = load_config(a.params, a.profile)
    device = torch.device(a.device)

    from models.text_encoder import hidden_size

    text_dim = hidden_size(cfg.features.encoder.kind, cfg.features.encoder.path)
    text_len = cfg.features.encoder.max_length
    seconds = {}

    def stamp(name: str, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - start
        print(f"  {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return out

    counts = {
        "base": stamp("count base", lambda: generator_counts(cfg, "base", text_dim)),
        "superres": stamp("count superres", lambda: generator_counts(cfg, "superres", text_dim)),
        "evaluator": stamp("count evaluator", lambda: evaluator_counts(cfg, text_dim, text_len)),
        "tokenizer_base": stamp("count tokenizer base", lambda: tokenizer_counts(cfg, "base")),
        "tokenizer_superres": stamp("count tokenizer superres", lambda: tokenizer_counts(cfg, "superres")),
        "decoder_ft": stamp("count decoder_ft", lambda: decoder_counts(cfg)),
    }
    text = stamp("count text encoder", lambda: text_encoder_counts(cfg))
    images = stamp("image bytes", lambda: image_bytes(cfg.data.builtin.image_size))
    on_gpu = device.type == "cuda"
    depth = a.time_depth or (cfg.base.model.depth if on_gpu else 2)
    batch = a.time_batch or (64 if on_gpu else 4)
    timing = stamp("time base steps", lambda: time_base_steps(cfg, text_dim, depth, batch, a.time_steps, device))
    timing["matmul_peak"] = stamp("matmul peak", lambda: matmul_peak(device))
    timing["device"] = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    if on_gpu:  # a measured MFU replaces the transformer assumption (the timed model is the real base)
        peak = a.h100_tflops if "H100" in timing["device"] else a.a100_tflops if "A100" in timing["device"] else None
        if peak:
            timing["measured_mfu"] = timing["stage_flops_per_s"] / (peak * 1e12)
            a.mfu_transformer = timing["measured_mfu"]
    d = derive(cfg, counts, text, images, a)

    command = "benchmarks/bench_scaling.py " + " ".join(sys.argv[1:])
    lines = markdown(cfg, d, counts, text, timing, images, a)
    print("\n".join(lines))
    total_s = time.perf_counter() - began
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "command": command,
              "profile": cfg.profile, "assumptions": vars(a) | {"out": str(a.out), "params": str(a.params)},
              "counts": counts, "text_encoder": text, "images": images, "timing": timing, "derived": d,
              "seconds": seconds | {"total": total_s}}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1, default=str))
    if a.record:
        record(result, d, timing, a)
    print(f"\n(total {total_s:.0f} s)", file=sys.stderr)


def record(result: dict, d: dict, timing: dict, a) -> None:
    rows = {r["stage"]: r for r in d["train"]}
    tot = d["totals"]["train"]["H100"]
    base = rows["base"]
    nodes = d["base_nodes"]["at_configured_batch"]

    def node_case(c: dict) -> str:
        return (f"{c['nodes']} node{'s' if c['nodes'] > 1 else ''} ({c['per_gpu_batch']}/GPU): {g(c['wall_h[overlap]'])} - "
                f"{g(c['wall_h[serial]'])} h, {g(c['gpu_h[overlap]'])} - {g(c['gpu_h[serial]'])} GPU-h")

    if "measured_mfu" in timing:
        basis = (f"**Transformer MFU measured on {timing['device']}**: the `{result['profile']}` base generator's "
                 f"training step (full depth, batch {timing['batch']}, bf16 autocast) ran at "
                 f"{timing['measured_mfu']:.1%} of the {a.h100_tflops:g} TFLOP/s peak, and that figure replaces the "
                 "assumed transformer MFU below; the conv nets' MFU, the other accelerators and the prices are still "
                 "assumptions, and every GPU-hour figure is derived from exact FLOP counts.")
    else:
        basis = (f"**Derived, not measured on a GPU** (none was available): exact FLOP counts of each "
                 f"`{result['profile']}` training step on CPU, turned into GPU-hours and dollars with assumed MFU, "
                 "peak FLOP/s and prices.")
    lines = [
        "## Scaling (derived) — bench_scaling.py",
        "",
        basis + " The full tables, formulas and the comparison with the seeds are in "
        "[`infra/SCALING.md`](../infra/SCALING.md).",
        "",
        f"Regenerated by `.venv/bin/python {result['command']}`; {result['date']}.",
        f"Machine: {result['machine']}.",
        f"Assumptions: MFU {a.mfu_transformer:.0%} transformers / {a.mfu_conv:.0%} conv nets; H100 {a.h100_tflops:g}, "
        f"A100 {a.a100_tflops:g}, TPU v5e {a.tpu_tflops:g} TFLOP/s bf16; assumed list prices ${a.price_h100:.2f} / "
        f"${a.price_a100:.2f} / ${a.price_tpu:.2f} per hour; inter-node {a.internode_gbps:g} Gbit/s per node. "
        "`train.batch_size` is the global batch, split over the GPUs (`components/training.py`, `per_process_batch`).",
        "",
        "| stage | train GFLOP / image | images/s per H100 (derived) | GPUs | per-GPU batch | steps x global batch | H100-h | H100 $ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r['stage']} | {r['flops_per_image'] / 1e9:,.0f} | {g(r['images_per_s[H100]'])} | {r['world']} | "
          f"{r['per_gpu_batch']} | {r['steps']:,} x {r['batch']:,} | {g(r['hours[H100]'])} | {g(r['cost[H100]'])} |"
          for r in d["train"]],
        f"| **total** | | | | | | **{g(tot['hours'])}** | **${g(tot['cost'])}** |",
        "",
        f"FLOP-count sanity check, measured here: base generator (width {timing['width']}, depth {timing['depth']}, "
        f"batch {timing['batch']}) trains at {timing['stage_flops_per_s'] / 1e9:,.0f} GFLOP/s through the stage's module and "
        f"{timing['plain_flops_per_s'] / 1e9:,.0f} GFLOP/s as a plain PyTorch loop "
        f"({timing['stage_s_per_step']:.2f} vs {timing['plain_s_per_step']:.2f} s/step), against a measured matmul peak of "
        f"{timing['matmul_peak'] / 1e9:,.0f} GFLOP/s ({timing['stage_flops_per_s'] / timing['matmul_peak']:.0%}): "
        "the counted FLOPs are the work actually done.",
        f"All-reduce of the base model's grads on its configured {base['world']} GPUs ({base['nodes']} node{'s' if base['nodes'] > 1 else ''}, "
        f"{'inter-node' if base['nodes'] > 1 else 'NVLink'}): "
        f"{base['allreduce']['seconds'] * 1e3:,.1f} ms/step vs {base['allreduce']['step_compute_s'] * 1e3:,.1f} ms of compute "
        f"at {base['per_gpu_batch']} per GPU (ratio {base['allreduce']['ratio']:.2f}).",
        f"base at global batch {base['batch']:,}, {base['steps']:,} steps (DDP overlap - none): "
        + "; ".join(node_case(c) for c in nodes) + ".",
        "",
    ]
    print(replace_section(REPO / "benchmarks" / "RESULTS.md", "bench_scaling", lines))


if __name__ == "__main__":
    main()
