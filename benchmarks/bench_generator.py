"""Base-generator training step from precomputed data vs online encoding; full-cascade sampling throughput.

Training step (same model, batch, optimizer, keys; one process, interleaved repeats):
  precomputed  tokens from the `tokens` stage + text features from the `features` stage (what the
               `base` stage trains on), then forward/backward/AdamW step
  online       the same batch read from the image shards, tokenized by the base tokenizer and its
               captions encoded by the frozen text encoder, then the same step
On a CPU the precomputed step is also timed under bf16 autocast (what `precision: bf16-mixed` does
there; `auto` trains fp32 on a CPU), which pays on CPUs with native bf16 (AVX512-BF16, AMX).
Sampling: the full cascade (text encoder -> base -> super-res -> decoder) at the profile's default
steps and guidance, batches of --batch prompts, images/s.

On --device cuda the step runs as the stage trains there (precision auto = bf16 autocast, fp32
weights) and the table adds tokens/s and MFU: the step's FLOPs (torch.utils.flop_counter, forward +
backward; elementwise ops, norms and the optimizer not counted, the usual convention) over the
time, against --peak-tflops (H100 SXM bf16 dense: 989) and against a bf16 matmul measured in the
same run.

Reads the trained pipeline's outputs (run `make demo` first):

    .venv/bin/python benchmarks/bench_generator.py --steps 30
    .venv/bin/python benchmarks/bench_generator.py --device cuda --untrained --out /tmp/gpu.md

--untrained needs no artifacts (for a GPU machine they do not travel to): the models are built
from params with random weights (the profile's architecture, so the same work per step), --items
train scenes are drawn and PNG-encoded as the data stage does, and the precomputed store is those
scenes tokenized and encoded once, held in memory as the stores return it (fp16 features).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_scaling import count, matmul_peak, stubs, sync, total  # noqa: E402
from benchmarks.common import OnlineInputs, machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402
from components.generator import TokenTextDataset, draw_masks, open_stores, spec_for  # noqa: E402


@dataclass
class Parts:
    """What the benchmark times, from the trained pipeline or built untrained from params."""

    spec: object  # the base MaskedTransformerSpec
    keys: list[str]  # train items to draw batches from
    precomputed: Callable[[list[str]], dict]  # keys -> batch on the host, as the base stage's dataset gives it
    online: Callable[[list[str]], dict]  # keys -> the same batch encoded on the fly, on the device
    cascade: object  # models.cascade.Cascade on the device
    prompts: list[str]  # sampling prompts
    source: str


def online_encoding(tokenizer, encoder, pixels: Callable[[list[str]], torch.Tensor], captions: dict[str, str]):
    """keys -> the batch built on the fly: host-decoded pixels tokenized and captions encoded on the
    models' device (what training would do without the tokens and features stages)."""
    device = next(tokenizer.parameters()).device

    def online(batch_keys: list[str]) -> dict:
        with torch.no_grad():
            tokens = tokenizer.encode(pixels(batch_keys).to(device)).flatten(1)  # [B, g*g]
        text, mask = encoder.encode([captions[k] for k in batch_keys])  # [B, L, D], [B, L]
        return {"tokens": tokens, "text": text, "text_mask": mask}

    return online


def trained_parts(cfg, art: Path, device: torch.device) -> Parts:
    from components.superres import load_for_inference

    tokens, features = open_stores(art / "tokens", art / "features")
    spec = spec_for(cfg.base, tokens, features, "base")
    keys = tokens.keys[tokens.keys["split"] == "train"]["key"].tolist()
    dataset = TokenTextDataset(tokens, features, keys, "base")
    index = {k: i for i, k in enumerate(dataset.keys)}
    inputs = OnlineInputs(cfg, art)
    online = online_encoding(inputs.tokenizer.to(device), inputs.encoder.to(device), inputs.pixels, inputs.captions)
    cascade = load_for_inference(cfg, art / "base", art / "superres", art / "tokenizer").to(device)
    test = inputs.accepted[inputs.accepted["split"] == "test"]["caption"].tolist()
    return Parts(spec, keys, lambda b: dataset.__getitems__([index[k] for k in b]), online, cascade, test,
                 f"trained models in {art}")


def untrained_parts(cfg, n_items: int, device: torch.device) -> Parts:
    from PIL import Image

    from components import tokenizer as tokenizer_stage
    from components.data import _encode
    from components.images import square_resize, to_tensor
    from models import shapes
    from models.cascade import Cascade, CascadeSettings
    from models.masked_transformer import MaskedTransformer
    from models.sampling import SamplerSettings
    from models.text_encoder import FrozenTextEncoder
    from models.tokenizer import ImageTokenizer

    enc, b = cfg.features.encoder, cfg.data.builtin
    encoder = FrozenTextEncoder.from_spec(enc.kind, enc.path, enc.max_length, device=device)
    tokens_meta, features_meta = stubs(cfg, encoder.dim)
    specs = {w: spec_for(getattr(cfg, w), tokens_meta, features_meta, w) for w in ("base", "superres")}
    torch.manual_seed(0)
    tokenizers = {w: ImageTokenizer(tokenizer_stage.spec_for(cfg.tokenizer, w)).eval().to(device)
                  for w in ("base", "superres")}
    scenes = [scene for _, _, scene in shapes.generate(b.seed, n_items, 0, 0, b.image_size, b.max_objects,
                                                       b.heldout_fraction)]  # the data stage's first train scenes
    keys = [f"train-{i:07d}" for i in range(n_items)]
    png = {k: _encode(shapes.render(s, b.image_size), b.image_format) for k, s in zip(keys, scenes)}
    captions = {k: shapes.caption(s) for k, s in zip(keys, scenes)}
    resolution = cfg.tokenizer.base.resolution

    def pixels(batch_keys: list[str]) -> torch.Tensor:  # [B,3,R,R]: decode + resize, as ShardImageDataset
        out = []
        for k in batch_keys:
            with Image.open(io.BytesIO(png[k])) as image:
                out.append(to_tensor(square_resize(image.convert("RGB"), resolution, k)))
        return torch.stack(out)

    online = online_encoding(tokenizers["base"], encoder, pixels, captions)
    store, dtype = {}, getattr(torch, enc.dtype)
    for i in range(0, n_items, 64):  # the tokens and features stages, once
        batch = online(keys[i:i + 64])
        for j, k in enumerate(keys[i:i + 64]):
            store[k] = (batch["tokens"][j].cpu(), batch["text"][j].to(dtype).cpu(), batch["text_mask"][j].cpu())

    def precomputed(batch_keys: list[str]) -> dict:
        tokens, text, mask = (torch.stack(x) for x in zip(*(store[k] for k in batch_keys)))
        return {"tokens": tokens, "text": text.float(), "text_mask": mask}

    settings = CascadeSettings(SamplerSettings(**asdict(cfg.base.sample)),
                               SamplerSettings(**asdict(cfg.superres.sample)))
    cascade = Cascade(encoder, MaskedTransformer(specs["base"]).eval(), MaskedTransformer(specs["superres"]).eval(),
                      tokenizers["base"], tokenizers["superres"], settings).to(device)
    return Parts(specs["base"], keys, precomputed, online, cascade, list(captions.values()),
                 f"untrained models built from params (random weights, the profile's architecture); "
                 f"{n_items} scenes drawn and PNG-encoded in memory")


def make_step(cfg, spec, device: torch.device, bf16: bool | None = None):
    """One training step on a host batch dict, as the base stage runs it on `device` (bf16: autocast
    to bfloat16; default: as precision auto does, i.e. on a GPU only)."""
    from models.masked_transformer import MaskedTransformer, masked_token_loss

    torch.manual_seed(0)
    model = MaskedTransformer(spec).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    g = torch.Generator().manual_seed(0)
    bf16 = device.type == "cuda" if bf16 is None else bf16  # None: precision auto
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def forward_backward(batch: dict) -> torch.Tensor:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        tokens = batch["tokens"]
        masked, dropped = draw_masks(g, *tokens.shape, cfg.train.text_dropout)
        masked, dropped = masked.to(device), dropped.to(device)
        with autocast:
            logits = model(tokens.masked_fill(masked, spec.mask_id), batch["text"],
                           batch["text_mask"] & ~dropped[:, None])
        loss = masked_token_loss(logits.float(), tokens, masked)
        loss.backward()
        return loss

    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(batch)
        optimizer.step()

    return step, forward_backward


def timed_steps(step, batches, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for make in batches:
        step(make())
    sync(device)
    return time.perf_counter() - start


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def time_training(cfg, parts: Parts, batch_size: int, args, device: torch.device) -> dict:
    rng = np.random.default_rng(0)
    batch_keys = [[parts.keys[i] for i in rng.integers(0, len(parts.keys), batch_size)] for _ in range(args.steps)]
    step, forward_backward = make_step(cfg.base, parts.spec, device)
    step(parts.precomputed(batch_keys[0]))  # warm-up: kernels, allocator, optimizer state
    step(parts.online(batch_keys[0]))
    # on a CPU also the same step under bf16 autocast: what `precision: bf16-mixed` would change there
    step_bf16 = make_step(cfg.base, parts.spec, device, bf16=True)[0] if device.type == "cpu" else None
    if step_bf16:
        step_bf16(parts.precomputed(batch_keys[0]))
    pre, online, pre_bf16 = [], [], []
    for _ in range(args.repeats):  # interleaved, best of
        pre.append(timed_steps(step, [lambda b=b: parts.precomputed(b) for b in batch_keys], device))
        online.append(timed_steps(step, [lambda b=b: parts.online(b) for b in batch_keys], device))
        if step_bf16:
            pre_bf16.append(timed_steps(step_bf16, [lambda b=b: parts.precomputed(b) for b in batch_keys], device))
    # only the GPU table reports FLOP/s and MFU; counting costs one more step
    flops = total(count(lambda: forward_backward(parts.precomputed(batch_keys[0])))) if device.type == "cuda" else None
    log(f"batch {batch_size}: precomputed {min(pre) / args.steps:.4f} s/step, online {min(online) / args.steps:.4f}")
    return {"batch": batch_size, "pre_s": min(pre) / args.steps, "online_s": min(online) / args.steps,
            "pre_bf16_s": min(pre_bf16) / args.steps if pre_bf16 else None,
            "tokens": batch_size * parts.spec.n_tokens, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: params.yaml's)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--untrained", action="store_true", help="models built from params, no artifacts needed")
    parser.add_argument("--items", type=int, default=512, help="--untrained: train scenes to draw batches from")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-batches", default=None,
                        help="comma-separated training batch sizes (default: the profile's base.train.batch_size)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per sampling batch")
    parser.add_argument("--sample-batches", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    cfg = load_config(args.params, args.profile)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    parts = untrained_parts(cfg, args.items, device) if args.untrained else trained_parts(cfg, args.artifacts, device)
    log(f"built: {parts.source}")
    batches = [int(b) for b in args.train_batches.split(",")] if args.train_batches else [cfg.base.train.batch_size]
    rows = [time_training(cfg, parts, b, args, device) for b in batches]

    prompts = (parts.prompts * (1 + args.batch * args.sample_batches // max(len(parts.prompts), 1)))
    prompts = prompts[:args.batch * args.sample_batches]
    cascade = parts.cascade
    cascade.generate(prompts[:2], seed=0)  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(args.sample_batches):
        cascade.generate(prompts[i * args.batch:(i + 1) * args.batch], seed=i * args.batch)
    sync(device)
    sample_s = time.perf_counter() - start
    log(f"sampling: {args.batch * args.sample_batches} images in {sample_s:.1f} s")
    n_images = args.batch * args.sample_batches
    s = cascade.settings
    peak = matmul_peak(device) if on_gpu else None

    m = cfg.base.model
    section = f"bench_generator_gpu_{cfg.profile}" if on_gpu else "bench_generator"
    lines = [
        "## Generators: training step from precomputed data vs online encoding; cascade sampling"
        + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""),
        "",
        f"Regenerated by `benchmarks/bench_generator.py {' '.join(sys.argv[1:])}` (profile {cfg.profile}); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        f"Models: {parts.source}. Base model: {m.depth} layers x {m.width}, {parts.spec.n_tokens} tokens "
        f"({parts.spec.grid}x{parts.spec.grid}), codebook {parts.spec.codebook_size}; best of {args.repeats} "
        f"interleaved runs of {args.steps} steps"
        + ("; bf16 autocast with fp32 weights (the stage's precision auto on a GPU)." if on_gpu else "; fp32."),
        "",
    ]
    if on_gpu:
        lines += [f"FLOPs per step counted by torch.utils.flop_counter (forward + backward). MFU against the "
                  f"{args.peak_tflops:g} TFLOP/s bf16 dense peak; the same bf16 8192^3 matmul measured here "
                  f"ran at {peak / 1e12:,.0f} TFLOP/s.", "",
                  "| batch | path | seconds/step | tokens/s | TFLOP/s | MFU | vs matmul measured | precompute speedup |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            for path, sec in (("precomputed", r["pre_s"]), ("online", r["online_s"])):
                tflops = r["flops"] / sec / 1e12
                lines.append(f"| {r['batch']} | {path} | {sec:.4f} | {r['tokens'] / sec:,.0f} | {tflops:.2f} | "
                             f"{tflops / args.peak_tflops:.2%} | {tflops * 1e12 / peak:.2%} | "
                             + (f"{r['online_s'] / r['pre_s']:.2f}x |" if path == "precomputed" else "- |"))
    else:
        lines += ["| batch | what | seconds/step | tokens/s | vs precomputed |", "| ---: | --- | ---: | ---: | --- |"]
        for r in rows:
            lines += [
                f"| {r['batch']} | base step, precomputed tokens + text features (the `base` stage's path) | "
                f"{r['pre_s']:.3f} | {r['tokens'] / r['pre_s']:,.0f} | - |",
                f"| {r['batch']} | base step, online: decode shards + tokenize + encode captions | {r['online_s']:.3f} | "
                f"{r['tokens'] / r['online_s']:,.0f} | {r['online_s'] / r['pre_s']:.2f}x slower "
                f"(precompute speedup {r['online_s'] / r['pre_s']:.2f}x) |",
                f"| {r['batch']} | base step, precomputed, bf16 autocast (`precision: bf16-mixed`; `auto` is fp32 on a "
                f"CPU) | {r['pre_bf16_s']:.3f} | {r['tokens'] / r['pre_bf16_s']:,.0f} | "
                f"{r['pre_s'] / r['pre_bf16_s']:.2f}x faster |"]
    lines += [
        "",
        f"Full-cascade sampling: {n_images} images in {sample_s:.1f} s = **{n_images / sample_s:.2f} images/s** "
        f"(batches of {args.batch}; base {s.base.steps} steps at guidance {s.base.guidance:g}, super-res "
        f"{s.superres.steps} steps at guidance {s.superres.guidance:g}, {cascade.resolution}px output; guided "
        "steps run the conditional and unconditional passes as one batch).",
        "",
    ]
    print(replace_section(args.out, section, lines))


if __name__ == "__main__":
    main()
