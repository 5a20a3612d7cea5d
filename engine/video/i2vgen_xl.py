"""I2VGen-XL adapted to transformers 5 and to per-request seeds.

diffusers' (deprecated) I2VGenXLPipeline defaults to `clip_skip=1`: the prompt embedding is the
penultimate CLIP layer's hidden state passed through the text model's final layer norm, which it
reaches as `text_encoder.text_model.final_layer_norm`. transformers 5 flattened `CLIPTextModel`
(the norm is now `text_encoder.final_layer_norm`), so the default call raises AttributeError, and
the obvious workaround `clip_skip=None` silently switches to the last layer's output. The hidden
states themselves keep their v4 layout (embeddings first, then one per layer), so exposing the
norm under its old path for the duration of `encode_prompt` restores the original computation.

Upstream also samples the conditioning image's VAE posterior from the global RNG, so a video
depended on whatever ran before it. Here it is sampled from the request's generator (one per
batch member), which keeps the distribution and makes the output a function of the seed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import I2VGenXLPipeline


class _TextModelView:
    """The part of transformers 4's `CLIPTextModel.text_model` that diffusers reads."""

    def __init__(self, final_layer_norm: torch.nn.Module):
        self.final_layer_norm = final_layer_norm


@contextmanager
def text_model_alias(text_encoder):
    """Expose `text_encoder.text_model.final_layer_norm` while inside; a no-op on transformers 4.

    Set in the instance dict rather than as a submodule so the weights are not registered twice."""
    if text_encoder is None or hasattr(text_encoder, "text_model"):
        yield
        return
    text_encoder.__dict__["text_model"] = _TextModelView(text_encoder.final_layer_norm)
    try:
        yield
    finally:
        text_encoder.__dict__.pop("text_model", None)


class EmberI2VGenXLPipeline(I2VGenXLPipeline):
    """I2VGenXLPipeline with upstream's clip-skip semantics and seeded image latents."""

    _image_latent_generator = None

    def encode_prompt(self, *args, **kwargs):
        with text_model_alias(self.text_encoder):
            return super().encode_prompt(*args, **kwargs)

    def __call__(self, *args, generator=None, **kwargs):
        self._image_latent_generator = generator
        try:
            return super().__call__(*args, generator=generator, **kwargs)
        finally:
            self._image_latent_generator = None

    def prepare_image_latents(self, image, device, num_frames, num_videos_per_prompt):
        """Upstream's method, sampling the VAE posterior with the call's generator(s)."""
        generator = self._image_latent_generator
        if isinstance(generator, list) and len(generator) != image.shape[0]:
            generator = None  # several videos per prompt: no per-image generator, as upstream
        image = image.to(device=device)
        image_latents = self.vae.encode(image).latent_dist.sample(generator)
        image_latents = image_latents * self.vae.config.scaling_factor

        # A frames axis: the image latent first, then a position mask for each later frame.
        image_latents = image_latents.unsqueeze(2)
        masks = [torch.ones_like(image_latents[:, :, :1]) * ((i + 1) / (num_frames - 1))
                 for i in range(num_frames - 1)]
        image_latents = torch.cat([image_latents, *masks], dim=2)

        image_latents = image_latents.repeat(num_videos_per_prompt, 1, 1, 1, 1)
        if self.do_classifier_free_guidance:
            image_latents = torch.cat([image_latents] * 2)
        return image_latents
