"""The cascade as one self-contained directory: what the registered MLflow model carries.

    bundle/
      cascade.json   format, version, sampler settings, text encoder reference
      tokenizer/     the base tokenizer (its encoder serves editing)
      decoder/       the super-res tokenizer whose decoder makes the pixels (decoder_ft's, if finetuned)
      base/          base generator
      superres/      super-res generator

Only weights (safetensors) and their JSON specs are copied, never a pickle. The frozen text encoder
is a reference (kind, path, max_length) checked by fingerprint on load, not a copy: it is shipped by
a package (MiniLM) or lives in the local Hugging Face cache, and is the same on every machine that
may serve the model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from components.config import CascadeConfig
from components.errors import BadInputError

FORMAT = "cascade-bundle"
FORMAT_VERSION = 1
MANIFEST = "cascade.json"
PARTS = ("tokenizer", "decoder", "base", "superres")


def _files(part: str) -> tuple[str, str]:
    from models import masked_transformer, tokenizer

    mod = tokenizer if part in ("tokenizer", "decoder") else masked_transformer
    return mod.SPEC_FILE, mod.WEIGHTS_FILE


def _encoder_reference(base_dir: Path, superres_dir: Path) -> dict:
    """The text encoder both generators were trained with, from their saved metadata."""
    from models.masked_transformer import read_generator_meta

    refs = []
    for directory in (base_dir, superres_dir):
        try:
            ref = read_generator_meta(directory).get("text_encoder") or {}
        except ValueError as err:
            raise BadInputError(str(err)) from None
        if not ref.get("fingerprint"):
            raise BadInputError(f"{directory}: generator.json records no text encoder fingerprint; retrain it")
        refs.append({k: ref.get(k) for k in ("kind", "path", "max_length", "fingerprint")})
    if refs[0]["fingerprint"] != refs[1]["fingerprint"]:
        raise BadInputError(f"{base_dir} and {superres_dir} were trained with different text encoders")
    return refs[0]


def write_bundle(out_dir: Path, cfg: CascadeConfig, tokenizer_dir: Path, base_dir: Path, superres_dir: Path,
                 decoder_dir: Path | None = None) -> Path:
    """Copy the cascade's parts into out_dir (replacing what was there); returns out_dir."""
    out_dir = Path(out_dir)
    sources = {"tokenizer": Path(tokenizer_dir) / "base",
               "decoder": Path(decoder_dir) if decoder_dir is not None else Path(tokenizer_dir) / "superres",
               "base": Path(base_dir), "superres": Path(superres_dir)}
    for part, src in sources.items():
        for name in _files(part):
            if not (src / name).is_file():
                raise BadInputError(f"{src / name}: missing; cannot bundle the {part} (run its stage first)")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION,
                "text_encoder": _encoder_reference(sources["base"], sources["superres"]),
                "sample": {"base": asdict(cfg.base.sample), "superres": asdict(cfg.superres.sample)}}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for part, src in sources.items():
        (out_dir / part).mkdir(parents=True)
        for name in _files(part):
            shutil.copy2(src / name, out_dir / part / name)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out_dir


def read_manifest(directory: Path) -> dict:
    from models.weights import read_meta

    try:
        return read_meta(Path(directory) / MANIFEST, fmt=FORMAT, version=FORMAT_VERSION)
    except ValueError as err:  # already one line naming the file
        raise BadInputError(str(err)) from None


def load_bundle(directory: Path, device: str = "cpu"):
    """models.cascade.Cascade from a bundle; every failure is a one-line BadInputError."""
    from models.cascade import Cascade, CascadeSettings
    from models.masked_transformer import load_generator
    from models.sampling import SamplerSettings
    from models.text_encoder import FrozenTextEncoder
    from models.tokenizer import load_tokenizer

    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        ref, sample = manifest["text_encoder"], manifest["sample"]
        settings = CascadeSettings(SamplerSettings(**sample["base"]), SamplerSettings(**sample["superres"]))
        encoder = FrozenTextEncoder.from_spec(ref["kind"], ref["path"], ref["max_length"], device=device)
        if encoder.fingerprint != ref["fingerprint"]:
            raise BadInputError(f"{directory / MANIFEST}: text encoder {ref['kind']} ({ref['path'] or 'packaged'}) "
                                "on this machine differs from the one the cascade was trained with "
                                "(fingerprint mismatch)")
        return Cascade(encoder, load_generator(directory / "base", device=device),
                       load_generator(directory / "superres", device=device),
                       load_tokenizer(directory / "tokenizer", device=device),
                       load_tokenizer(directory / "decoder", device=device), settings)
    except (KeyError, TypeError) as err:
        raise BadInputError(f"{directory / MANIFEST}: malformed ({type(err).__name__}: {err})") from None
    except ValueError as err:  # loaders and contracts already give one line naming the file
        raise BadInputError(str(err)) from None
