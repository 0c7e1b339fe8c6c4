"""Saved models: safetensors weights next to a JSON file holding the typed spec.

One format for every network the pipeline exports (tokenizers, generators): the loader reads the
spec first, so an architecture mismatch is reported before any tensor is touched, and nothing here
loads a pickle. Every failure is a one-line ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn


def save_module(module: nn.Module, directory: Path, *, fmt: str, version: int, spec: dict,
                weights_file: str, spec_file: str, extra: dict | None = None) -> Path:
    """directory/<weights_file> (state_dict) + directory/<spec_file> ({format, version, spec, ...})."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / weights_file
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    # write-then-rename so a killed run never leaves a half-written checkpoint under the final name
    tmp = weights.with_suffix(weights.suffix + ".tmp")
    save_file(state, str(tmp), metadata={"format": fmt})
    tmp.replace(weights)
    meta = {"format": fmt, "version": version, "spec": spec, **(extra or {})}
    (directory / spec_file).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return weights


def read_meta(path: Path, *, fmt: str, version: int) -> dict:
    """The JSON next to the weights, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a saved {fmt} directory?)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: not a {fmt} file (format field is {found!r})")
    if meta.get("version") != version:
        raise ValueError(f"{path}: unsupported version {meta.get('version')!r} (this code reads {version})")
    return meta


def read_safetensors(path: Path, missing: str = "missing") -> dict:
    """A safetensors file's tensors on CPU; a missing or unreadable file is a one-line ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {missing}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors ({' '.join(str(e).split())})") from None


def spec_from_dict(cls, d, what: str):
    """Build a spec dataclass from its saved dict; unknown or missing keys are one-line ValueErrors."""
    from dataclasses import fields

    if not isinstance(d, dict):
        raise ValueError(f"{what} spec: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} spec: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return cls(**d)
    except TypeError as e:  # missing required keys
        raise ValueError(f"{what} spec: {e}") from None


def load_state_into(module: nn.Module, weights_path: Path, spec_file: str) -> nn.Module:
    """Load safetensors weights into `module`, refusing missing, unexpected or mis-shaped tensors."""
    state = read_safetensors(weights_path)
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        n = len(missing) + len(unexpected)
        raise ValueError(f"{weights_path}: does not match the spec in {spec_file}: {what} ({n} key(s) differ)")
    for k, v in own.items():
        if state[k].shape != v.shape:
            raise ValueError(f"{weights_path}: {k} has shape {list(state[k].shape)}, the spec in {spec_file} "
                             f"needs {list(v.shape)}")
    module.load_state_dict(state)
    return module


def load_saved(directory: Path, *, what: str, fmt: str, version: int, spec_cls, build, weights_file: str,
               spec_file: str, expect=None, device="cpu") -> nn.Module:
    """Read the spec (checked against `expect` field by field), build the module with `build(spec)`,
    load its weights; eval mode on `device`. Every failure is a one-line ValueError naming the file."""
    from dataclasses import fields

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: {what} directory does not exist")
    spec_path = directory / spec_file
    meta = read_meta(spec_path, fmt=fmt, version=version)
    try:
        spec = spec_cls.from_dict(meta.get("spec"))
    except ValueError as e:
        raise ValueError(f"{spec_path}: {e}") from None
    if expect is not None and spec != expect:
        mismatch(spec_path, spec, expect, [f.name for f in fields(spec_cls)])
    return load_state_into(build(spec), directory / weights_file, spec_file).to(device).eval()


def directory_digest(directory: Path, names: tuple[str, ...]) -> str:
    """sha256 over the named files' bytes (name-separated): a saved model's content address."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path}: missing")
        h.update(name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def mismatch(spec_path: Path, saved, wanted, fields_of) -> None:
    """Raise naming the first field where a saved spec differs from the expected one."""
    for name in fields_of:
        a, b = getattr(saved, name), getattr(wanted, name)
        if a != b:
            fmt = (lambda v: str(list(v)) if isinstance(v, tuple) else str(v))
            raise ValueError(f"{spec_path}: {name} {fmt(a)} does not match the config's {fmt(b)}")

