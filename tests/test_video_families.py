"""Families (schemas, validation, batching keys), loading, the I2VGen-XL adapter and export."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from diffusers import I2VGenXLPipeline, LTXImageToVideoPipeline, StableVideoDiffusionPipeline
from PIL import Image

from engine.errors import InvalidInput
from engine.video.demo import build_tiny_i2v
from engine.video.export import to_gif, to_mp4
from engine.video.families import I2VGEN_XL, LTX, SVD, family_for, load_pipeline
from engine.video.i2vgen_xl import EmberI2VGenXLPipeline
from tests.video_fixtures import decode_mp4, inputs_for, test_image, tiny_family



def test_i2vgen_xl_schema_matches_the_seed_inputs():
    schema = I2VGEN_XL.input_schema({"max_frames": 8, "width": 32, "height": 32})
    props = schema["properties"]
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["image", "prompt"]
    assert {"image", "prompt", "max_frames", "guidance_scale", "num_inference_steps"} <= set(props)
    assert {"negative_prompt", "seed", "fps", "width", "height"} <= set(props)
    assert props["image"] == {**props["image"], "type": "string", "format": "uri"}
    assert props["max_frames"]["default"] == 8
    assert (props["max_frames"]["minimum"], props["max_frames"]["maximum"]) == (2, 64)
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (1, 500)
    assert props["guidance_scale"] == {**props["guidance_scale"], "type": "number", "default": 9.0}
    assert "default" not in props["seed"]
    assert [p["x-order"] for p in props.values()] == list(range(len(props)))


def test_each_family_has_its_own_schema():
    svd = SVD.input_schema()["properties"]
    ltx = LTX.input_schema()["properties"]
    assert "prompt" not in svd and {"motion_bucket_id", "noise_aug_strength", "max_guidance_scale"} <= set(svd)
    assert "prompt" in ltx and "8k+1" in ltx["max_frames"]["description"]
    assert ltx["width"]["minimum"] == 32


def test_limits_and_defaults_are_configurable():
    family = I2VGEN_XL.configure(defaults={"num_inference_steps": 25}, limits={"max_frames": {"maximum": 24}})
    schema = family.input_schema()["properties"]
    assert schema["num_inference_steps"]["default"] == 25 and schema["max_frames"]["maximum"] == 24
    with pytest.raises(InvalidInput, match="max_frames must be <= 24"):
        family.normalize(inputs_for("i2vgen-xl", max_frames=32))
    with pytest.raises(ValueError, match="no input"):
        I2VGEN_XL.configure(defaults={"num_frames": 8})


@pytest.mark.parametrize("change, message", [
    ({"max_frames": 65}, "max_frames must be <= 64"),
    ({"max_frames": 1}, "max_frames must be >= 2"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
    ({"num_inference_steps": 501}, "num_inference_steps must be <= 500"),
    ({"guidance_scale": 30}, "guidance_scale must be <= 20"),
    ({"max_frames": "16"}, "max_frames must be of type integer"),
    ({"max_frames": True}, "max_frames must be of type integer"),
    ({"width": 36}, "width must be a multiple of 8"),
    ({"strength": 1}, "unknown input"),
    ({"image": "https://example.com/a.png"}, "decoded to an image"),
])
def test_normalize_rejects_bad_inputs(change, message):
    with pytest.raises(InvalidInput, match=message):
        tiny_family("i2vgen-xl").normalize(inputs_for("i2vgen-xl", **change))


def test_normalize_fills_defaults_and_family_rules():
    inputs = tiny_family("i2vgen-xl").normalize(inputs_for("i2vgen-xl", guidance_scale=7, seed=None))
    assert inputs["guidance_scale"] == 7.0 and isinstance(inputs["guidance_scale"], float)
    assert inputs["negative_prompt"] == "" and inputs["seed"] is None and inputs["max_frames"] == 4
    with pytest.raises(InvalidInput, match="8k\\+1 for ltx \\(e.g. 9\\)"):
        tiny_family("ltx").normalize(inputs_for("ltx", max_frames=12))
    with pytest.raises(InvalidInput, match="multiple of 32"):
        tiny_family("ltx").normalize(inputs_for("ltx", height=48))


def test_batch_key_ignores_per_request_inputs_but_not_shapes():
    family = tiny_family("i2vgen-xl")
    key = family.batch_key(family.normalize(inputs_for("i2vgen-xl")))
    same = family.normalize(inputs_for("i2vgen-xl", seed=9, prompt="other", negative_prompt="blur",
                                       image=test_image(seed=3)))
    assert family.batch_key(same) == key
    for change in ({"num_inference_steps": 3}, {"guidance_scale": 5.0}, {"max_frames": 6},
                   {"width": 40}, {"fps": 8}, {"image": test_image(48, 32)}):
        assert family.batch_key(family.normalize(inputs_for("i2vgen-xl", **change))) != key


def test_family_for_class_and_name():
    assert family_for("I2VGenXLPipeline") is I2VGEN_XL and family_for("svd") is SVD
    assert family_for("LTXImageToVideoPipeline") is LTX
    with pytest.raises(ValueError, match="no image-to-video family"):
        family_for("StableDiffusionPipeline")


def test_load_pipeline_takes_the_class_from_model_index(tiny_video_dirs, tiny_pipelines):
    assert type(tiny_pipelines["i2vgen-xl"]) is EmberI2VGenXLPipeline
    assert type(tiny_pipelines["svd"]) is StableVideoDiffusionPipeline
    assert type(tiny_pipelines["ltx"]) is LTXImageToVideoPipeline
    explicit = load_pipeline(str(tiny_video_dirs["ltx"]), "LTXImageToVideoPipeline", dtype="bf16")
    assert explicit.transformer.dtype == torch.bfloat16


def test_tiny_builds_are_deterministic(tmp_path, tiny_video_dirs):
    again = build_tiny_i2v(tmp_path / "again", "i2vgen-xl", seed=0)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / name).read_bytes() == (tiny_video_dirs["i2vgen-xl"] / name).read_bytes()


def _prompt_embeds(pipe, clip_skip):
    pipe._guidance_scale = 9.0  # encode_prompt reads it to decide on negative embeddings
    return pipe.encode_prompt("a red balloon", "cpu", 1, negative_prompt="blurry", clip_skip=clip_skip)


def test_i2vgen_xl_clip_skip_uses_the_penultimate_layer_and_final_norm(tiny_pipelines):
    """clip_skip=1 must mean what it meant with transformers 4: the penultimate layer's hidden
    state through the final layer norm. The reference is the same encoder with its last layer
    removed, whose ordinary output is exactly that."""
    pipe = tiny_pipelines["i2vgen-xl"]
    truncated = copy.deepcopy(pipe.text_encoder)
    truncated.encoder.layers = truncated.encoder.layers[:-1]

    def manual(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return truncated(ids).last_hidden_state

    positive, negative = _prompt_embeds(pipe, clip_skip=1)
    torch.testing.assert_close(positive, manual("a red balloon"))
    torch.testing.assert_close(negative, manual("blurry"))
    last_layer, _ = _prompt_embeds(pipe, clip_skip=None)
    assert not torch.allclose(positive, last_layer, atol=1e-3)  # skipping no layer would change outputs
    assert not hasattr(pipe.text_encoder, "text_model")  # the alias does not outlive the call


def test_i2vgen_xl_image_latents_follow_upstream_and_the_seed(tiny_pipelines):
    pipe = tiny_pipelines["i2vgen-xl"]
    pipe._guidance_scale = 9.0
    image = torch.rand(2, 3, 32, 32) * 2 - 1

    def ours(generator):
        pipe._image_latent_generator = generator
        try:
            return pipe.prepare_image_latents(image, "cpu", 4, 1)
        finally:
            pipe._image_latent_generator = None

    torch.manual_seed(0)
    upstream = I2VGenXLPipeline.prepare_image_latents(pipe, image, "cpu", 4, 1)
    torch.manual_seed(0)
    torch.testing.assert_close(ours(None), upstream, rtol=0, atol=0)

    seeded = ours([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    again = ours([torch.Generator().manual_seed(1), torch.Generator().manual_seed(3)])
    torch.testing.assert_close(seeded[0], again[0])  # member 0 does not depend on member 1
    assert not torch.allclose(seeded[1], again[1])


def test_to_mp4_pads_odd_sizes_and_keeps_frames():
    frames = np.stack([np.asarray(test_image(33, 31, seed=i)) for i in range(5)]) / 255.0
    video = decode_mp4(to_mp4(frames, fps=8))
    assert video.shape == (5, 32, 34, 3)
    assert np.abs(video[:, :31, :33] - frames * 255).mean() < 4


def test_to_gif_has_every_frame():
    frames = [test_image(seed=i) for i in range(3)]
    gif = Image.open(io.BytesIO(to_gif(frames, fps=10)))
    assert gif.n_frames == 3 and gif.info["duration"] == 100
