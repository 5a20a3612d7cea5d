"""Tiny image-to-video pipelines, built locally and deterministically.

No model hub is reachable, so tests, benchmarks and `ember demo` build random-weight pipelines of
the real classes (component sizes as in diffusers' own tests) and save them with
`save_pretrained`. They load through the same `load_pipeline` path as real weights.
"""

from __future__ import annotations

import string
from pathlib import Path

FAMILIES = ("i2vgen-xl", "svd", "ltx")

# Inputs that fit each tiny pipeline; use them as the version's default inputs.
TINY_DEFAULTS: dict[str, dict] = {
    "i2vgen-xl": {"width": 32, "height": 32, "max_frames": 4, "num_inference_steps": 2},
    "svd": {"width": 32, "height": 32, "max_frames": 4, "num_inference_steps": 2},
    "ltx": {"width": 32, "height": 32, "max_frames": 9, "num_inference_steps": 2},
}


def build_tiny_i2v(out_dir: Path, family: str = "i2vgen-xl", seed: int = 0) -> Path:
    """Build a tiny pipeline of `family` into `out_dir` (a folder with model_index.json)."""
    builders = {"i2vgen-xl": _i2vgen_xl, "svd": _svd, "ltx": _ltx}
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builders[family](seed).save_pretrained(out_dir)
    return out_dir


def _clip_tokenizer():
    """A byte-level CLIP tokenizer without merges: every character is a token.

    transformers 5 ignores `vocab_file`/`merges_file` in the constructor, so the vocabulary is
    passed in directly."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in chars:
            vocab[char + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    """A unigram T5 tokenizer over single characters (with and without the word marker)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(char, -3.0), ("\u2581" + char, -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=128)


def _clip_image_encoder(seed: int, image_size: int, patch_size: int, hidden_size: int = 4):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden_size, projection_dim=hidden_size, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size,
                              intermediate_size=4 * hidden_size, patch_size=patch_size)
    return CLIPVisionModelWithProjection(config)


def _feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size=32, size=32)


def _i2vgen_xl(seed: int):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, I2VGenXLPipeline, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = I2VGenXLUNet(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=4, attention_head_dim=4, num_attention_heads=None, norm_num_groups=2,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"], latent_channels=4, sample_size=32, norm_num_groups=2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=4, intermediate_size=16,
        layer_norm_eps=1e-5, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
        hidden_act="gelu", projection_dim=32,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return I2VGenXLPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        image_encoder=_clip_image_encoder(seed, image_size=32, patch_size=1),
        feature_extractor=_feature_extractor(), unet=unet, scheduler=scheduler,
    )


def _svd(seed: int):
    import torch
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler,
                           StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel)

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=2, projection_class_embeddings_input_dim=24,
        addition_time_embed_dim=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], latent_channels=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    # SVD resizes the conditioning image to 224x224 for CLIP, so the encoder must take that size.
    image_encoder = _clip_image_encoder(seed, image_size=224, patch_size=32, hidden_size=32)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=scheduler, feature_extractor=_feature_extractor())


def _ltx(seed: int):
    import torch
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler,
                           LTXImageToVideoPipeline, LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, num_layers=1, caption_channels=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    )
    return LTXImageToVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                   text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
