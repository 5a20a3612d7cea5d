"""Input schemas per version (published as OpenAPI, enforced before anything is queued)."""

from __future__ import annotations

from typing import Any

import jsonschema

from engine.errors import InvalidInput
from engine.registry import Version
from engine.sampling_bounds import BOUNDS, non_finite_path


def text_input_schema(version: Version) -> dict:
    """The seed's LLM inputs, with this version's defaults and limits; sampling bounds come from
    engine/sampling_bounds.py."""
    d = {"max_new_tokens": 128, "min_new_tokens": -1, "temperature": 0.7, "top_p": 1.0, "top_k": 0,
         "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
         "system_prompt": "", "prompt_template": version.prompt_template or "", "min_p": 0.0,
         **version.default_inputs}
    max_len = int(version.limits.get("max_model_len", 1 << 20))
    props: dict[str, Any] = {
        "prompt": {"type": "string", "title": "Prompt", "x-order": 0},
        "system_prompt": {"type": "string", "default": d["system_prompt"], "x-order": 1,
                          "description": "System prompt sent to the model before the prompt."},
        "prompt_template": {"type": "string", "default": d["prompt_template"], "x-order": 2,
                            "description": "Template with {prompt} (and optionally {system_prompt}); "
                                           "empty uses the model's chat template."},
        "max_new_tokens": BOUNDS["max_new_tokens"].json_schema(maximum=max_len, default=d["max_new_tokens"],
                                                               **{"x-order": 3}),
        "min_new_tokens": BOUNDS["min_new_tokens"].json_schema(maximum=max_len, default=d["min_new_tokens"],
                                                               **{"x-order": 4}),
        **{name: BOUNDS[name].json_schema(default=d[name], **{"x-order": order})
           for order, name in enumerate(("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                         "presence_penalty", "frequency_penalty"), start=5)},
        "stop_sequences": {"type": "string", "x-order": 12,
                           "description": "Comma-separated stop sequences"},
        "seed": BOUNDS["seed"].json_schema(**{"x-order": 13}),
    }
    return {"type": "object", "title": "Input", "required": ["prompt"], "properties": props,
            "additionalProperties": False}


# Version limits (models.yaml `limits:`) that bound a video input's maximum.
VIDEO_INPUT_LIMITS = {"max_frames": "max_frames", "max_steps": "num_inference_steps",
                      "max_width": "width", "max_height": "height"}


def video_family(version: Version):
    """The version's video family with its default inputs and limits applied."""
    from engine.video.families import family_for

    limits = {VIDEO_INPUT_LIMITS[k]: {"maximum": int(v)} for k, v in version.limits.items()
              if k in VIDEO_INPUT_LIMITS}
    return family_for(version.pipeline_class or "I2VGenXLPipeline").configure(version.default_inputs, limits)


def embedding_input_schema(version: Version) -> dict:
    """What an embedding version takes (published for listings; predictions do not run it)."""
    text = {"type": "string", "minLength": 1}
    ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    props = {
        "input": {"title": "Input", "x-order": 0, "oneOf": [
            text, ids, {"type": "array", "minItems": 1, "items": text},
            {"type": "array", "minItems": 1, "items": ids}]},
        "dimensions": {"type": "integer", "minimum": 1, "x-order": 1},
    }
    return {"type": "object", "title": "Input", "required": ["input"], "properties": props,
            "additionalProperties": False}


def input_schema(version: Version) -> dict:
    if version.kind == "text-generation":
        return text_input_schema(version)
    if version.kind == "embedding":
        return embedding_input_schema(version)
    return video_family(version).input_schema()


def output_schema(version: Version) -> dict:
    if version.kind == "text-generation":
        return {"type": "array", "items": {"type": "string"}, "title": "Output",
                "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"}
    if version.kind == "embedding":
        return {"type": "array", "title": "Output", "items": {"type": "array", "items": {"type": "number"}}}
    return {"type": "string", "format": "uri", "title": "Output"}


def validate_input(version: Version, inputs: Any) -> dict:
    """Check inputs against the version's schema; fill defaults. Errors name the field."""
    if not isinstance(inputs, dict):
        raise InvalidInput("input must be an object", param="input")
    bad_number = non_finite_path(inputs)
    if bad_number:
        raise InvalidInput(f"{bad_number}: NaN and Infinity are not valid numbers", param=f"input.{bad_number}")
    if version.kind == "embedding":
        raise InvalidInput(f"{version.model} is an embedding model; it answers embeddings requests, "
                           "not predictions.", param="version")
    schema = input_schema(version)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(inputs), key=lambda e: list(e.path))
    if errors:
        error = errors[0]
        field = ".".join(str(p) for p in error.path)
        if error.validator == "additionalProperties":
            unknown = sorted(set(inputs) - set(schema["properties"]))
            field = unknown[0] if unknown else field
            message = f"unknown input field(s) {unknown}; allowed: {sorted(schema['properties'])}"
        elif error.validator == "required":
            field = error.message.split("'")[1] if "'" in error.message else field
            message = error.message
        else:
            message = f"{field}: {error.message}"
        raise InvalidInput(message, param=f"input.{field}" if field else "input")
    filled = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    filled.update(inputs)
    return filled
