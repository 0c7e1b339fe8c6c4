"""Benchmark Cascade's data path on this machine, each stage next to a baseline measured in the same run.

    .venv/bin/python benchmarks/bench_data.py [--profile tiny] [--n 2000] [--repeats 3] [--fast-repeats 7] [--out benchmarks/RESULTS.md]

What it measures (items/s; the median of --fast-repeats runs for the sub-second measurements and of
--repeats runs for the slow ones: cold feature runs and online encoding):

1. User data in: a webdataset source in img2dataset layout (KEY.jpg / KEY.txt / KEY.json in tars of
   --per-tar items; JPEGs rendered from the shapes generator) is built in a temp dir, then
   `components.ingest.ingest` and `components.validate.run` are timed separately and back to back.
   Baseline: a plain loop that streams the same tars with `tarfile`, fully decodes every image with
   PIL and every caption as UTF-8 -- the work no ingestion + validation can avoid. The Great
   Expectations suite (`components.expectations.run_suite` on the accepted manifest) is also timed on
   its own: it is a per-run cost that does not grow much with N, so it dominates small datasets.
2. The built-in `data` stage (`components.data.run`) on the profile's sizes: render + encode + shard.
   Baseline: the same scenes rendered and encoded in a plain loop, nothing written.
3. The `features` cache: a cold run (empty cache: loads the text encoder, encodes every unique
   caption) vs a warm rerun (encodes nothing), and `FeatureStore.lookup` of every accepted key in
   shuffled training-sized batches vs encoding those captions online with
   `FrozenTextEncoder.encode` -- the ratio is what generator training gains from the cache.

It rewrites only its own section of --out, between the bench_data markers, so other benchmarks can
keep theirs in the same file. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, even without the editable install

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components.config import load_config  # noqa: E402

NOISY = 1.5  # max/min over the repeats above which a row is flagged: its median is not to be trusted far
START, END = "<!-- bench_data:start -->", "<!-- bench_data:end -->"
SECTION_TITLE = "## Data: ingestion, validation, feature cache"
RESULTS_HEADER = """# Benchmark results

Measured by the scripts in `benchmarks/` (see `benchmarks/README.md`) on the machine each section
names. Every script regenerates only its own section, between its `<!-- NAME:start -->` and
`<!-- NAME:end -->` markers, so rerunning one benchmark leaves the others' results in place.
Numbers are only comparable within a section (same machine, same run); rerun to compare yours:

    .venv/bin/python benchmarks/bench_data.py --profile tiny --out benchmarks/RESULTS.md
"""


@dataclass
class Row:
    what: str
    items: int
    seconds: float
    baseline_ips: float | None = None  # items/s of the row's baseline, measured in the same run
    note: str = ""

    @property
    def ips(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_ips is None else self.ips / self.baseline_ips


def log(msg: str) -> None:
    print(f"[bench_data] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class Timing(float):
    """Median seconds of some repeats; `.spread` keeps (min, max) so the report can show the noise."""

    spread: tuple[float, float]

    @classmethod
    def of(cls, times: list[float]) -> "Timing":
        t = cls(statistics.median(times))
        t.spread = (min(times), max(times))
        return t


def median_of(fn: Callable[[int], Any], repeats: int) -> tuple[Timing, Any]:
    """Median seconds of `repeats` calls fn(i) (i = repeat index) and the last call's result."""
    times, result = [], None
    for i in range(repeats):
        seconds, result = timed(lambda: fn(i))
        times.append(seconds)
    return Timing.of(times), result


# --- the user-data source ----------------------------------------------------------------------


def build_webdataset(root: Path, n: int, image_size: int, seed: int, max_objects: int, heldout: float,
                     per_tar: int) -> list[Path]:
    """img2dataset layout: NNNNN.tar holding KEY.jpg, KEY.txt, KEY.json; keys are 9-digit running numbers."""
    from models import shapes

    root.mkdir(parents=True, exist_ok=True)
    tars: list[Path] = []
    tar = None
    scenes = shapes.generate(seed=seed, n_train=n, n_val=0, n_test=0, image_size=image_size,
                             max_objects=max_objects, heldout_fraction=heldout)
    try:
        for i, (_, _, scene) in enumerate(scenes):
            if i % per_tar == 0:
                if tar is not None:
                    tar.close()
                tars.append(root / f"{i // per_tar:05d}.tar")
                tar = tarfile.open(tars[-1], "w")
            key, text = f"{i:09d}", shapes.caption(scene)
            buf = io.BytesIO()
            shapes.render(scene, image_size).save(buf, format="JPEG", quality=95)
            meta = {"key": key, "caption": text, "status": "success", "url": f"https://example.invalid/{key}.jpg",
                    "width": image_size, "height": image_size}
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", text.encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    finally:
        if tar is not None:
            tar.close()
    return tars


def baseline_decode(tars: list[Path]) -> int:
    """The irreducible work: stream every tar, fully decode every image and caption. Returns images decoded."""
    n = 0
    for path in tars:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                data = tar.extractfile(info).read()
                suffix = info.name.rpartition(".")[2]
                if suffix == "jpg":
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                    n += 1
                elif suffix == "txt":
                    data.decode("utf-8")
    return n


# --- the benchmarks ----------------------------------------------------------------------------


def bench_user_data(cfg, work: Path, n: int, per_tar: int, repeats: int) -> tuple[list[Row], dict]:
    from components.expectations import run_suite
    from components.ingest import ingest
    from components.validate import run as validate

    b = cfg.data.builtin
    log(f"building a {n}-item webdataset source ({b.image_size}px JPEG, {per_tar} items per tar)")
    build_s, tars = timed(lambda: build_webdataset(work / "source", n, b.image_size, b.seed, b.max_objects,
                                                   b.heldout_fraction, per_tar))

    baseline_decode(tars[:1])  # warm-up: imports, PIL plugin registration
    log("baseline: tarfile stream + PIL decode")
    base_s, decoded = median_of(lambda i: baseline_decode(tars), repeats)
    assert decoded == n, f"baseline decoded {decoded} of {n} images"
    base_ips = n / base_s

    # great_expectations takes seconds to import; that is a once-per-process cost, kept out of the
    # validate timings and reported on its own.
    gx_import_s, _ = timed(lambda: __import__("great_expectations"))

    ingest_times, validate_times, together, result = [], [], [], None
    for i in range(repeats + 1):  # repeat 0 is a warm-up (first GX context, first parquet writes)
        log(f"ingest + validate, {'warm-up' if i == 0 else f'repeat {i}/{repeats}'}")
        data_dir, val_dir = work / f"ingested-{i}", work / f"validated-{i}"
        t_ing, ing = timed(lambda: ingest(str(work / "source"), data_dir, cfg.data.shard_size,
                                          cfg.data.val_fraction, cfg.data.test_fraction))
        t_val, result = timed(lambda: validate(cfg.validate, data_dir, val_dir))
        assert ing.n_items == n and result.n_items == n, (ing.n_items, result.n_items)
        if i:
            ingest_times.append(t_ing)
            validate_times.append(t_val)
            together.append(t_ing + t_val)
    ingest_s, validate_s, together_s = Timing.of(ingest_times), Timing.of(validate_times), Timing.of(together)

    accepted = pd.read_parquet(result.accepted_path)
    gx_s, (gx_ok, _) = median_of(lambda i: run_suite(accepted, cfg.validate, work / f"gx-docs-{i}"), repeats)

    rows = [
        Row("baseline: stream tars + PIL full decode + caption decode", n, base_s,
            note="the irreducible work; the reference for the next rows"),
        Row("`ingest` (webdataset tars -> shards + manifest)", n, ingest_s, base_ips),
        Row("`validate` (every check + GX suite + Data Docs)", n, validate_s, base_ips),
        Row("&nbsp;&nbsp;of which the GX suite + Data Docs (`run_suite`)", len(accepted), gx_s,
            note="fixed cost per run, mostly independent of N"),
        Row("&nbsp;&nbsp;`validate` without the GX suite (derived)", n, max(validate_s - gx_s, 1e-9), base_ips,
            note="validate median minus GX median"),
        Row("`ingest` + `validate`, back to back", n, together_s, base_ips),
    ]
    info = {"n": n, "tars": len(tars), "per_tar": per_tar, "build_s": build_s, "gx_import_s": gx_import_s,
            "source_mb": sum(p.stat().st_size for p in tars) / 2**20, "accepted": result.n_accepted,
            "quarantined": result.n_quarantined, "gx_success": gx_ok, "validate_dir": work / f"validated-{repeats}"}
    return rows, info


def baseline_render_encode(b) -> int:
    """Built-in data without the platform: the same scenes rendered and encoded, nothing written."""
    from components.data import _encode  # the stage's own encoder call, so both sides encode alike
    from models import shapes

    n = 0
    for _, _, scene in shapes.generate(seed=b.seed, n_train=b.n_train, n_val=b.n_val, n_test=b.n_test,
                                       image_size=b.image_size, max_objects=b.max_objects,
                                       heldout_fraction=b.heldout_fraction):
        _encode(shapes.render(scene, b.image_size), b.image_format)
        n += 1
    return n


def bench_builtin(cfg, work: Path, repeats: int) -> list[Row]:
    from components.data import run as data_run

    b = cfg.data.builtin
    n = b.n_train + b.n_val + b.n_test
    log(f"data stage: built-in shapes, {n} items at {b.image_size}px {b.image_format}")
    base_s, _ = median_of(lambda i: baseline_render_encode(b), repeats)
    stage_s, result = median_of(lambda i: data_run(cfg.data, work / f"builtin-{i}"), repeats)
    assert result.n_items == n, (result.n_items, n)
    return [
        Row("baseline: render + encode the same scenes, nothing written", n, base_s),
        Row(f"`data` stage, built-in ({b.image_size}px {b.image_format}: render + encode + shard + manifest)",
            n, stage_s, n / base_s),
    ]


def bench_features(cfg, validate_dir: Path, work: Path, repeats: int, fast: int) -> tuple[list[Row], dict]:
    from components.features import FeatureStore, read_accepted
    from components.features import run as features_run
    from models.text_encoder import FrozenTextEncoder

    enc = cfg.features.encoder
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what the features stage would use
    # Loaded before the cold runs so that none of them pays the one-time transformers import;
    # the online-encoding baseline below reuses it.
    load_s, encoder = timed(lambda: FrozenTextEncoder.from_spec(enc.kind, enc.path, enc.max_length, device=device))
    cold_times, cold = [], None
    for i in range(repeats):  # each cold run starts from an empty cache, so it loads the encoder too
        log(f"features: cold run {i + 1}/{repeats}")
        seconds, cold = timed(lambda: features_run(cfg.features, validate_dir, work / f"features-{i}"))
        cold_times.append(seconds)
    cache = work / f"features-{repeats - 1}"
    log("features: warm reruns")
    warm_s, warm = median_of(lambda i: features_run(cfg.features, validate_dir, cache), fast)
    assert warm.n_encoded == 0, f"a warm rerun encoded {warm.n_encoded} captions"
    cold_s = Timing.of(cold_times)

    # Training reads features for shuffled batches of keys; do both sides in the same order and batch size.
    batch = cfg.features.batch_size
    accepted = read_accepted(validate_dir)
    caption_of = dict(zip(accepted["key"], accepted["caption"]))
    keys = list(caption_of)
    random.Random(0).shuffle(keys)
    batches = [keys[s:s + batch] for s in range(0, len(keys), batch)]

    store = FeatureStore.open(cache)
    store.lookup(batches[0])  # warm-up: opens the pack

    def lookup_all(_: int) -> None:
        for keys_ in batches:
            store.lookup(keys_)

    log("FeatureStore.lookup vs online encoding")
    lookup_s, _ = median_of(lookup_all, fast)

    encoder.encode([caption_of[k] for k in batches[0]])  # warm-up: first-call allocations, kernels

    def encode_all(_: int) -> None:
        for keys_ in batches:
            encoder.encode([caption_of[k] for k in keys_])
        if device == "cuda":
            torch.cuda.synchronize()  # count the GPU work, not just its launch

    online_s, _ = median_of(encode_all, repeats)

    n_items, n_unique = cold.n_items, cold.n_unique_captions
    rows = [
        Row(f"`features` cold (empty cache: load encoder, encode {n_unique} unique captions)", n_items, cold_s,
            note="includes loading the encoder"),
        Row("`features` warm rerun (all cached, encodes nothing)", n_items, warm_s, n_items / cold_s,
            note="baseline = the cold run; ratio = speedup"),
        Row(f"online: `FrozenTextEncoder.encode`, batches of {batch}", len(keys), online_s,
            note="what training would pay without the cache (encoder already loaded)"),
        Row(f"`FeatureStore.lookup`, shuffled batches of {batch}", len(keys), lookup_s, len(keys) / online_s,
            note="baseline = online encoding; ratio = what training gains"),
    ]
    info = {"n_unique": n_unique, "n_packs": cold.n_packs, "dim": cold.dim, "max_length": enc.max_length,
            "dtype": enc.dtype, "kind": enc.kind, "device": device, "mean_tokens": cold.mean_tokens,
            "load_s": load_s}
    return rows, info


# --- report ------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        ram = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none available to this task"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                               text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": cpu,
        "cores": f"{os.cpu_count()} (os.cpu_count()); torch threads {torch.get_num_threads()}",
        "RAM": ram,
        "GPU": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "OS": platform.platform(),
        "commit": commit,
        # Other processes on the machine skew timings; this says how busy it was when the run began.
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}" if x >= 100 else f"{x:.{max(digits, 2)}f}"


def table(rows: list[Row]) -> list[str]:
    out = ["| what | items | seconds (median) | min–max s | items/s | baseline items/s | ratio | note |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}x"
        spread, note = getattr(r.seconds, "spread", None), r.note
        if spread and spread[1] > NOISY * spread[0]:
            note = "; ".join(filter(None, [note, f"**noisy**: max/min {spread[1] / spread[0]:.1f}x"]))
        spread = "–" if spread is None else f"{spread[0]:.3f}–{spread[1]:.3f}"
        out.append(f"| {r.what} | {r.items:,} | {r.seconds:.3f} | {spread} | {_num(r.ips)} | "
                   f"{_num(r.baseline_ips)} | {ratio} | {note} |")
    return out


def takeaways(user_rows: list[Row], builtin: list[Row], feat_rows: list[Row]) -> list[str]:
    """One line per question the benchmark answers, computed from this run's rows (never stale)."""
    _, ingest, validate, gx, _, both = user_rows
    _, stage = builtin
    cold, warm, online, lookup = feat_rows
    return [
        f"- Ingest + validate run at {both.ratio:.0%} of the bare decode loop's speed ({both.ips:,.0f} vs "
        f"{both.baseline_ips:,.0f} items/s); the GX suite is {gx.seconds / validate.seconds:.0%} of validate's "
        f"time at this N, a fixed cost that shrinks in share as N grows.",
        f"- The built-in data stage keeps {stage.ratio:.0%} of the render + encode speed ({stage.ips:,.0f} items/s).",
        f"- A warm features rerun is {warm.ratio:.0f}x faster than a cold one ({warm.seconds:.2f} s vs "
        f"{cold.seconds:.2f} s).",
        f"- Reading text features from the cache is {lookup.ratio:.0f}x faster than encoding online "
        f"({lookup.ips:,.0f} vs {online.ips:,.0f} items/s): what generator training gains per epoch.",
    ]


def section(args, cfg, mach: dict, user: tuple, builtin: list[Row], feats: tuple, total_s: float) -> str:
    user_rows, u = user
    feat_rows, f = feats
    b = cfg.data.builtin
    lines = [
        START,
        SECTION_TITLE,
        "",
        "Regenerated by `benchmarks/bench_data.py`; do not edit by hand. This run:",
        "",
        "    " + " ".join([".venv/bin/python", "benchmarks/bench_data.py", *sys.argv[1:]]),
        "",
        *[f"- {k}: {v}" for k, v in mach.items()],
        f"- profile `{args.profile}`; each timing is the median of {args.fast_repeats} runs ({args.repeats} for "
        f"cold feature runs and online encoding; ingest/validate after one warm-up run); whole benchmark "
        f"{total_s:.0f} s",
        f"- user data: {u['n']:,} items, {b.image_size}x{b.image_size} JPEG (quality 95) from the shapes generator, "
        f"img2dataset layout in {u['tars']} tars of {u['per_tar']} ({u['source_mb']:.1f} MiB; built in "
        f"{u['build_s']:.1f} s, not timed below); validate accepted {u['accepted']:,}, quarantined "
        f"{u['quarantined']:,}; GX suite success: {u['gx_success']}",
        f"- one-time `import great_expectations`: {u['gx_import_s']:.1f} s (paid by the first validate in a "
        "process; excluded from the rows below)",
        f"- text encoder: {f['kind']} (dim {f['dim']}, max_length {f['max_length']}, cache dtype {f['dtype']}) "
        f"on {f['device']}; {f['n_unique']:,} unique captions, {f['mean_tokens']:.1f} tokens on average, "
        f"{f['n_packs']} pack(s); first encoder load in the process (with the transformers import) {f['load_s']:.1f} s, excluded "
        "from the rows below; the cold rows include the stage's own (warm-import) load",
        "",
        "ratio = items/s of the row / baseline items/s (above 1: faster than the baseline). Rows marked",
        f"**noisy** varied by more than {NOISY}x across repeats (other load on the machine, or torch's",
        "OpenMP threads on shared vCPUs): rerun on an idle machine, or try `--threads 1`, before comparing them.",
        "",
        *takeaways(user_rows, builtin, feat_rows),
        "",
        "### 1. User data: ingestion and validation",
        "",
        *table(user_rows),
        "",
        "### 2. Built-in data stage",
        "",
        *table(builtin),
        "",
        "### 3. Feature cache",
        "",
        *table(feat_rows),
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of `path` (between its markers), or append it; other sections stay."""
    old = path.read_text() if path.is_file() else RESULTS_HEADER
    if START in old and END in old:
        head, rest = old.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny", help="params.yaml profile (smoke, tiny, base256)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--n", type=int, default=2000, help="items in the generated webdataset source")
    parser.add_argument("--per-tar", type=int, default=500, help="items per source tar")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the slow measurements: cold feature runs, online encoding")
    parser.add_argument("--fast-repeats", type=int, default=7,
                        help="timed runs of every other measurement (a second or less each; noisier)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the whole run (default: torch's own choice)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with every dataset it wrote")
    args = parser.parse_args(argv)
    if min(args.n, args.repeats, args.fast_repeats, args.per_tar) < 1:
        parser.error("--n, --per-tar, --repeats and --fast-repeats must be >= 1")

    cfg = load_config(args.params, args.profile, overrides={"data.source": "builtin"})
    if args.threads:
        torch.set_num_threads(args.threads)
    mach = machine()  # before the run: the load average should show what else was running
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        user = bench_user_data(cfg, work, args.n, args.per_tar, args.fast_repeats)
        builtin = bench_builtin(cfg, work, args.fast_repeats)
        feats = bench_features(cfg, user[1]["validate_dir"], work, args.repeats, args.fast_repeats)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = section(args, cfg, mach, user, builtin, feats, time.perf_counter() - start)
    write_section(args.out, text)
    print(text)
    log(f"wrote the section to {args.out}")


if __name__ == "__main__":
    main()
