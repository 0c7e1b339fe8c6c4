"""The cascade as one self-contained directory: what the registered MLflow model carries.

    bundle/
      cascade.json   format, version, generator family, sampler settings, text encoder reference
      masked family:
        tokenizer/   the base tokenizer (its encoder serves editing)
        decoder/     the super-res tokenizer whose decoder makes the pixels (decoder_ft's, if finetuned)
        base/        base generator
        superres/    super-res generator
      diffusion family:
        vae/         the base KL-VAE (decoder_ft's, if finetuned): latents -> low-res pixels
        base/        latent diffusion model (DiT or U-Net)
        superres/    pixel super-res diffusion model

Only weights (safetensors) and their JSON specs are copied, never a pickle. The frozen text encoder
is a reference (kind, path, max_length) checked by fingerprint on load, not a copy: it is shipped by
a package (MiniLM) or lives in the local Hugging Face cache, and is the same on every machine that
may serve the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.config import CascadeConfig
from components.errors import BadInputError

FORMAT = "cascade-bundle"
FORMAT_VERSION = 1
MANIFEST = "cascade.json"
PARTS = ("tokenizer", "decoder", "base", "superres")  # the masked family's
DIFFUSION_PARTS = ("vae", "base", "superres")  # the diffusion family's: vae = the base KL-VAE (decoder_ft's, if finetuned)


def _files(family: str, part: str) -> tuple[str, str]:
    from models import diffusion, masked_transformer, tokenizer

    if part in ("tokenizer", "decoder", "vae"):
        mod = tokenizer
    else:
        mod = diffusion if family == "diffusion" else masked_transformer
    return mod.SPEC_FILE, mod.WEIGHTS_FILE


def _generator_meta(family: str, directory: Path) -> dict:
    from models.diffusion import read_diffusion_meta
    from models.masked_transformer import read_generator_meta

    return (read_diffusion_meta if family == "diffusion" else read_generator_meta)(directory)


def _encoder_reference(family: str, base_dir: Path, superres_dir: Path) -> dict:
    """The text encoder both generators were trained with, from their saved metadata."""
    refs = []
    for directory in (base_dir, superres_dir):
        try:
            ref = _generator_meta(family, directory).get("text_encoder") or {}
        except ValueError as err:
            raise BadInputError(str(err)) from None
        if not ref.get("fingerprint"):
            raise BadInputError(f"{directory}: the saved model records no text encoder fingerprint; retrain it")
        refs.append({k: ref.get(k) for k in ("kind", "path", "max_length", "fingerprint")})
    if refs[0]["fingerprint"] != refs[1]["fingerprint"]:
        raise BadInputError(f"{base_dir} and {superres_dir} were trained with different text encoders")
    return refs[0]


def _sources(family: str, tokenizer_dir: Path, base_dir: Path, superres_dir: Path,
             decoder_dir: Path | None) -> dict[str, Path]:
    if family == "diffusion":
        return {"vae": Path(decoder_dir) if decoder_dir is not None else Path(tokenizer_dir) / "base",
                "base": Path(base_dir), "superres": Path(superres_dir)}
    return {"tokenizer": Path(tokenizer_dir) / "base",
            "decoder": Path(decoder_dir) if decoder_dir is not None else Path(tokenizer_dir) / "superres",
            "base": Path(base_dir), "superres": Path(superres_dir)}


def write_bundle(out_dir: Path, cfg: CascadeConfig, tokenizer_dir: Path, base_dir: Path, superres_dir: Path,
                 decoder_dir: Path | None = None) -> Path:
    """Copy the cascade's parts into out_dir (replacing what was there); returns out_dir."""
    from components.cascades import sampler_params

    out_dir, family = Path(out_dir), cfg.generator.family
    sources = _sources(family, tokenizer_dir, base_dir, superres_dir, decoder_dir)
    for part, src in sources.items():
        for name in _files(family, part):
            if not (src / name).is_file():
                raise BadInputError(f"{src / name}: missing; cannot bundle the {part} (run its stage first)")
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "family": family,
                "text_encoder": _encoder_reference(family, sources["base"], sources["superres"]),
                "sample": sampler_params(cfg)}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for part, src in sources.items():
        (out_dir / part).mkdir(parents=True)
        for name in _files(family, part):
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
    """The cascade (models.cascade.Cascade or models.diffusion_cascade.DiffusionCascade) from a
    bundle; every failure is a one-line BadInputError."""
    from models.text_encoder import FrozenTextEncoder

    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        ref, sample = manifest["text_encoder"], manifest["sample"]
        family = manifest.get("family", "masked")  # bundles from before the diffusion family
        if family not in ("masked", "diffusion"):
            raise BadInputError(f"{directory / MANIFEST}: unknown generator family {family!r}")
        encoder = FrozenTextEncoder.from_spec(ref["kind"], ref["path"], ref["max_length"], device=device)
        if encoder.fingerprint != ref["fingerprint"]:
            raise BadInputError(f"{directory / MANIFEST}: text encoder {ref['kind']} ({ref['path'] or 'packaged'}) "
                                "on this machine differs from the one the cascade was trained with "
                                "(fingerprint mismatch)")
        if family == "diffusion":
            return _load_diffusion(directory, encoder, sample, device)
        return _load_masked(directory, encoder, sample, device)
    except (KeyError, TypeError) as err:
        raise BadInputError(f"{directory / MANIFEST}: malformed ({type(err).__name__}: {err})") from None
    except ValueError as err:  # loaders and contracts already give one line naming the file
        raise BadInputError(str(err)) from None


def _load_masked(directory: Path, encoder, sample: dict, device: str):
    from models.cascade import Cascade, CascadeSettings
    from models.masked_transformer import load_generator
    from models.sampling import SamplerSettings
    from models.tokenizer import load_tokenizer

    settings = CascadeSettings(SamplerSettings(**sample["base"]), SamplerSettings(**sample["superres"]))
    return Cascade(encoder, load_generator(directory / "base", device=device),
                   load_generator(directory / "superres", device=device),
                   load_tokenizer(directory / "tokenizer", device=device),
                   load_tokenizer(directory / "decoder", device=device), settings)


def _load_diffusion(directory: Path, encoder, sample: dict, device: str):
    from models.diffusion import load_diffusion
    from models.diffusion_sampling import DiffusionSampler
    from models.diffusion_cascade import DiffusionCascade, DiffusionCascadeSettings
    from models.tokenizer import load_tokenizer

    settings = DiffusionCascadeSettings(DiffusionSampler(**sample["base"]), DiffusionSampler(**sample["superres"]),
                                        float(sample["aug_level"]))
    return DiffusionCascade(encoder, load_diffusion(directory / "base", device=device),
                            load_diffusion(directory / "superres", device=device),
                            load_tokenizer(directory / "vae", device=device), settings)
