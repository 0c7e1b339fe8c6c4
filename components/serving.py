"""The registered cascade's MLflow pyfunc, logged as code (models-from-code: no pickled objects).

Input: a DataFrame (records when served; `pd.Series(prompts, name="prompt")` or, on the unwrapped
python model, a plain list of prompt strings) with
    prompt    str, required
    seed      int, optional: default the row's position; the same seed gives the same image
    guidance  float, optional: base-model guidance scale (default: the bundle's sampler settings)
    steps     int, optional: base-model decoding steps (default: the bundle's sampler settings)
Output: a DataFrame with prompt, seed and image (base64-encoded PNG at the cascade's resolution).

The weights come from the `cascade` artifact, a directory written by components.bundle.
"""

from __future__ import annotations

import base64
import io
from typing import NamedTuple

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

MAX_BATCH = 16  # images generated at once: bounds memory whatever the request size
OPTIONAL = {"seed": int, "guidance": float, "steps": int}


def _frame(model_input) -> pd.DataFrame:
    if isinstance(model_input, str):
        model_input = [model_input]
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, str) for p in model_input):
        model_input = pd.DataFrame({"prompt": list(model_input)})
    elif isinstance(model_input, (list, tuple, dict)):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise MlflowException.invalid_parameter_value(
            f"expected a DataFrame or a list of prompts, got {type(model_input).__name__}")
    if "prompt" not in model_input.columns:
        raise MlflowException.invalid_parameter_value(
            f"input needs a `prompt` column (got columns {[str(c) for c in model_input.columns]})")
    return model_input.reset_index(drop=True)


def _value(row: pd.Series, column: str, default):
    """The row's optional setting, cast to its type; missing/NaN means the default."""
    value = row.get(column)
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return default
    try:
        return OPTIONAL[column](value)
    except (TypeError, ValueError):
        raise MlflowException.invalid_parameter_value(f"row {row.name}: {column} {value!r} is not a number") from None


class Request(NamedTuple):
    position: int
    prompt: str
    seed: int
    guidance: float | None
    steps: int | None


def _request(position: int, row: pd.Series) -> Request:
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise MlflowException.invalid_parameter_value(f"row {position}: prompt must be a non-empty string, "
                                                      f"got {prompt!r}")
    return Request(position, prompt, _value(row, "seed", position), _value(row, "guidance", None),
                   _value(row, "steps", None))


def _png_base64(image) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class CascadeModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from components.bundle import load_bundle

        self.cascade = load_bundle(context.artifacts["cascade"], device="cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from components.images import to_uint8

        requests = [_request(i, row) for i, row in _frame(model_input).iterrows()]
        # rows with equal sampler settings share batches; per-row seeds keep each image independent of its batch
        groups: dict[tuple, list[Request]] = {}
        for r in requests:
            groups.setdefault((r.guidance, r.steps), []).append(r)
        images: dict[int, str] = {}
        for (guidance, steps), group in groups.items():
            for start in range(0, len(group), MAX_BATCH):
                chunk = group[start:start + MAX_BATCH]
                text, mask = self.cascade.encode_text([r.prompt for r in chunk])
                try:
                    pixels = self.cascade.generate_from_text(text, mask, seeds=[r.seed for r in chunk],
                                                             guidance=guidance, steps=steps)
                except ValueError as err:  # bad guidance/steps: one line from SamplerSettings
                    raise MlflowException.invalid_parameter_value(str(err)) from None
                for r, image in zip(chunk, to_uint8(pixels)):
                    images[r.position] = _png_base64(image)
        return pd.DataFrame({"prompt": [r.prompt for r in requests], "seed": [r.seed for r in requests],
                             "image": [images[r.position] for r in requests]})


mlflow.models.set_model(CascadeModel())
