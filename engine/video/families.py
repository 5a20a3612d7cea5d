"""Image-to-video pipeline families: what each accepts, how a batch of requests becomes one call.

A family is data: its input parameters (with defaults and limits), the rules the pipeline puts on
frame counts and sizes, and which pipeline keyword each input feeds. The worker, the input schema
and the batching key are all derived from that one table, so adding a family is adding a table.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float)}
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Param:
    """One input. `call_name` is the pipeline keyword it feeds (None: used by ember only).
    `per_request` inputs may differ inside a batch (they become lists); all others must match."""

    name: str
    type: str  # JSON Schema type: "string", "integer" or "number"
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""
    call_name: str | None = None
    per_request: bool = False
    required: bool = False
    format: str | None = None

    def schema(self, order: int) -> dict:
        prop: dict[str, Any] = {"type": self.type, "title": self.name.replace("_", " ").title(), "x-order": order}
        for key in ("format", "default", "minimum", "maximum"):
            if getattr(self, key) is not None:
                prop[key] = getattr(self, key)
        if self.description:
            prop["description"] = self.description
        return prop


@dataclass(frozen=True)
class VideoFamily:
    """A diffusers image-to-video pipeline class and the inputs ember exposes for it."""

    name: str
    pipeline_class: str
    params: tuple[Param, ...]
    frames_step: int = 1  # valid max_frames are frames_step * k + frames_offset
    frames_offset: int = 0
    size_multiple: int = 8

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def configure(self, defaults: dict | None = None, limits: dict | None = None) -> VideoFamily:
        """A copy with a version's default inputs and tighter/looser limits applied.

        `limits` maps an input name to {"minimum": .., "maximum": ..}."""
        defaults, limits = defaults or {}, limits or {}
        known = {p.name for p in self.params}
        unknown = (set(defaults) | set(limits)) - known
        if unknown:
            raise ValueError(f"{self.name} has no input(s) {sorted(unknown)}; known: {sorted(known)}")
        params = []
        for p in self.params:
            changes = dict(limits.get(p.name, {}))
            if p.name in defaults:
                changes["default"] = defaults[p.name]
            params.append(dataclasses.replace(p, **changes))
        return dataclasses.replace(self, params=tuple(params))

    def input_schema(self, defaults: dict | None = None, limits: dict | None = None) -> dict:
        """The JSON Schema ("Input" object) for this family's inputs."""
        family = self.configure(defaults, limits) if defaults or limits else self
        return {
            "type": "object",
            "title": "Input",
            "properties": {p.name: p.schema(i) for i, p in enumerate(family.params)},
            "required": [p.name for p in family.params if p.required],
            "additionalProperties": False,
        }

    def normalize(self, inputs: dict) -> dict:
        """Validate `inputs` (image already a PIL image) and fill in defaults; raise InvalidInput."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        unknown = set(inputs) - {p.name for p in self.params}
        if unknown:
            raise InvalidInput(f"unknown input(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        out = {}
        for p in self.params:
            if p.name not in inputs:
                if p.required:
                    raise InvalidInput(f"{p.name} is required", param=p.name)
                out[p.name] = p.default
                continue
            out[p.name] = _check_value(p, inputs[p.name])
        self._check_shape(out)
        return out

    def batch_key(self, inputs: dict) -> tuple:
        """Requests with equal keys can share one pipeline call. The image size is part of the key
        because pipelines crop every image of a batch by the first one's geometry."""
        shared = tuple((p.name, inputs[p.name]) for p in self.params if not p.per_request)
        return shared + (("image_size", inputs["image"].size),)

    def call_kwargs(self, batch: list[dict], generators: list) -> dict:
        """Keyword arguments for one pipeline call over a batch of normalized inputs, one image
        and one generator per request."""
        kwargs = {"generator": generators, "output_type": "np"}
        for p in self.params:
            if p.call_name is None:
                continue
            if p.per_request:
                kwargs[p.call_name] = [inputs[p.name] if inputs[p.name] is not None else "" for inputs in batch]
            else:
                kwargs[p.call_name] = batch[0][p.name]
        return kwargs

    def _check_shape(self, inputs: dict) -> None:
        frames = inputs["max_frames"]
        if (frames - self.frames_offset) % self.frames_step:
            raise InvalidInput(
                f"max_frames must be {self.frames_step}k+{self.frames_offset} for {self.name} "
                f"(e.g. {frames - (frames - self.frames_offset) % self.frames_step}), got {frames}",
                param="max_frames")
        for name in ("width", "height"):
            if inputs[name] % self.size_multiple:
                raise InvalidInput(f"{name} must be a multiple of {self.size_multiple} for {self.name}, "
                                   f"got {inputs[name]}", param=name)


def _check_value(p: Param, value: Any) -> Any:
    if p.format == "uri":
        from PIL import Image

        if not isinstance(value, Image.Image):
            raise InvalidInput(f"{p.name} must be decoded to an image before it reaches the worker", param=p.name)
        return value
    if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[p.type]):
        raise InvalidInput(f"{p.name} must be of type {p.type}, got {type(value).__name__}", param=p.name)
    if p.type == "number":
        value = float(value)
    if p.minimum is not None and value < p.minimum:
        raise InvalidInput(f"{p.name} must be >= {p.minimum}, got {value}", param=p.name)
    if p.maximum is not None and value > p.maximum:
        raise InvalidInput(f"{p.name} must be <= {p.maximum}, got {value}", param=p.name)
    return value


def _image() -> Param:
    return Param("image", "string", format="uri", call_name="image", per_request=True, required=True,
                 description="Input image: a data URI, an uploaded file's URL, or an http(s) URL where allowed.")


def _prompt(required: bool = True) -> Param:
    return Param("prompt", "string", call_name="prompt", per_request=True, required=required,
                 description="What should happen in the video.")


def _negative_prompt() -> Param:
    return Param("negative_prompt", "string", default="", call_name="negative_prompt", per_request=True,
                 description="What the video should not show.")


def _frames(default: int, minimum: int, maximum: int, rule: str = "") -> Param:
    return Param("max_frames", "integer", default, minimum, maximum, call_name="num_frames",
                 description=f"Number of frames to generate{rule}.")


def _steps(default: int) -> Param:
    return Param("num_inference_steps", "integer", default, 1, 500, call_name="num_inference_steps",
                 description="Number of denoising steps.")


def _size(name: str, default: int, multiple: int) -> Param:
    return Param(name, "integer", default, multiple, 2048, call_name=name,
                 description=f"Output {name} in pixels (a multiple of {multiple}).")


def _seed() -> Param:
    return Param("seed", "integer", None, 0, MAX_SEED, per_request=True,
                 description="Random seed. Leave blank to randomize.")


I2VGEN_XL = VideoFamily(
    name="i2vgen-xl",
    pipeline_class="I2VGenXLPipeline",
    params=(
        _image(),
        _prompt(),
        _negative_prompt(),
        _frames(16, 2, 64),
        _steps(50),
        Param("guidance_scale", "number", 9.0, 1.0, 20.0, call_name="guidance_scale",
              description="Classifier-free guidance scale (1 disables guidance)."),
        Param("fps", "integer", 16, 1, 60, call_name="target_fps",
              description="Frames per second of the output; also conditions the model."),
        _size("width", 1280, 8),
        _size("height", 704, 8),
        _seed(),
    ),
)

SVD = VideoFamily(
    name="svd",
    pipeline_class="StableVideoDiffusionPipeline",
    params=(
        _image(),
        _frames(14, 2, 64),
        _steps(25),
        Param("min_guidance_scale", "number", 1.0, 0.0, 20.0, call_name="min_guidance_scale",
              description="Guidance scale at the first frame (rises linearly to max_guidance_scale)."),
        Param("max_guidance_scale", "number", 3.0, 0.0, 20.0, call_name="max_guidance_scale",
              description="Guidance scale at the last frame."),
        Param("fps", "integer", 7, 2, 60, call_name="fps",
              description="Frames per second of the output; also conditions the model."),
        Param("motion_bucket_id", "integer", 127, 0, 255, call_name="motion_bucket_id",
              description="Amount of motion: higher moves more."),
        Param("noise_aug_strength", "number", 0.02, 0.0, 1.0, call_name="noise_aug_strength",
              description="Noise added to the conditioning image: higher departs more from it."),
        _size("width", 1024, 8),
        _size("height", 576, 8),
        _seed(),
    ),
)

LTX = VideoFamily(
    name="ltx",
    pipeline_class="LTXImageToVideoPipeline",
    params=(
        _image(),
        _prompt(),
        _negative_prompt(),
        _frames(161, 9, 257, rule=" (8k+1)"),
        _steps(50),
        Param("guidance_scale", "number", 3.0, 1.0, 20.0, call_name="guidance_scale",
              description="Classifier-free guidance scale (1 disables guidance)."),
        Param("fps", "integer", 25, 1, 60, call_name="frame_rate",
              description="Frames per second of the output; also conditions the model."),
        _size("width", 704, 32),
        _size("height", 512, 32),
        _seed(),
    ),
    frames_step=8,
    frames_offset=1,
    size_multiple=32,
)

FAMILIES = {f.pipeline_class: f for f in (I2VGEN_XL, SVD, LTX)}


def family_for(pipeline_class: str) -> VideoFamily:
    """The family for a diffusers pipeline class name (or a family name such as "svd")."""
    for family in FAMILIES.values():
        if pipeline_class in (family.pipeline_class, family.name):
            return family
    raise ValueError(f"no image-to-video family for {pipeline_class!r}; "
                     f"supported: {', '.join(FAMILIES)}")


def pipeline_class_of(path_or_repo: str, revision: str | None = None) -> str:
    """The `_class_name` recorded in a saved pipeline's model_index.json."""
    local = Path(path_or_repo) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())["_class_name"]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(path_or_repo, revision=revision)["_class_name"]


def load_pipeline(path_or_repo: str, pipeline_class: str | None = None, dtype: Any = "float32",
                  device: Any = "cpu", revision: str | None = None, cpu_offload: bool = False,
                  compile: bool = False):
    """Load a diffusers image-to-video pipeline (a local folder or a hub repo at `revision`).

    The class comes from configuration, or else from the folder's model_index.json. I2VGen-XL
    loads through ember's adapter subclass, which keeps its clip-skip semantics under
    transformers 5 (see engine/video/i2vgen_xl.py)."""
    import torch

    pipeline_class = pipeline_class or pipeline_class_of(path_or_repo, revision)
    family_for(pipeline_class)
    pipe = _pipeline_type(pipeline_class).from_pretrained(
        path_or_repo, torch_dtype=_torch_dtype(dtype), revision=revision)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if compile:
        for name in ("unet", "transformer"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.compile()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_type(pipeline_class: str) -> type:
    if pipeline_class == I2VGEN_XL.pipeline_class:
        from engine.video.i2vgen_xl import EmberI2VGenXLPipeline

        return EmberI2VGenXLPipeline
    import diffusers

    return getattr(diffusers, pipeline_class)


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype), str(dtype))
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    return getattr(torch, name)
