"""A local CLIP checkpoint for torchmetrics' CLIP score, loaded offline.

    metric = torchmetrics.multimodal.CLIPScore(model_name_or_path=load_local_clip("/path/to/clip"))

The directory is what `CLIPModel.save_pretrained` + `CLIPProcessor.save_pretrained` write (config.json,
model.safetensors, tokenizer and image-processor files), e.g. a downloaded openai/clip-vit-*. Nothing
is downloaded and only safetensors weights are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import CLIPProcessor


class ProjectedCLIP(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings [B,E]:
    torchmetrics 1.9 normalises their result as a tensor, transformers 5 returns a ModelOutput there."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.clip = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings to truncate

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output  # [B,E]

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # [B,E]


def load_local_clip(path: str | Path) -> Callable[[], tuple[ProjectedCLIP, CLIPProcessor]]:
    """Load the CLIP model and processor in `path` now (errors surface here, as one-line ValueErrors) and
    return the zero-argument callable that torchmetrics' CLIPScore / clip_score accept as model_name_or_path.
    The model is frozen and in eval mode."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(f"{directory}: CLIP checkpoint directory does not exist")
    from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar would bury the caller's output
    try:
        model_type = AutoConfig.from_pretrained(directory, local_files_only=True).model_type
    except Exception as e:
        raise ValueError(f"{directory}: not a CLIP checkpoint (no readable config.json: "
                         f"{(str(e).strip().splitlines() or [''])[0]})") from None
    if model_type != "clip":
        raise ValueError(f"{directory}: not a CLIP checkpoint (config.json model_type is {model_type!r})")
    try:
        model, loading = CLIPModel.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                   dtype=torch.float32, output_loading_info=True)
        # the PIL image processor: the default (fast) one needs torchvision, which these machines never have
        image_processor = CLIPImageProcessorPil.from_pretrained(directory, local_files_only=True)
        processor = CLIPProcessor(image_processor=image_processor,
                                  tokenizer=AutoTokenizer.from_pretrained(directory, local_files_only=True))
    except Exception as e:
        raise ValueError(f"{directory}: cannot load CLIP checkpoint ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]})") from None
    # transformers fills weights absent from the checkpoint with random values and only warns
    absent = sorted(loading["missing_keys"]) + sorted(str(k) for k in loading["mismatched_keys"])
    if absent:
        raise ValueError(f"{directory}: incomplete CLIP checkpoint: {len(absent)} weights missing or mis-shaped "
                         f"(e.g. {absent[0]})")
    wrapped = ProjectedCLIP(model).eval().requires_grad_(False)
    return lambda: (wrapped, processor)
