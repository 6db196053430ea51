"""Diffusion pipelines built from configs, with random weights and no download: for tests and benchmarks.

    pipe = tiny_ddpm_pipeline()                  # UNet2DModel + DDPMScheduler, 16x16 RGB, unconditional
    pipe = tiny_sd_pipeline()                    # StableDiffusionPipeline: CLIP text model + tokenizer built here,
                                                 # UNet2DConditionModel, AutoencoderKL; 32x32 images
    pipe = sd15_shaped_pipeline(dtype)           # the shapes of Stable Diffusion 1.5 (860M UNet), random weights
    pipe = tiny_sd3_pipeline()                   # StableDiffusion3Pipeline: SD3Transformer2DModel (a transformer
                                                 # denoiser), two CLIP towers and a T5 encoder; 32x32 images
    pipe = tiny_pixart_sigma_pipeline()          # PixArtSigmaPipeline: PixArtTransformer2DModel, T5 only; 32x32
    checker, extractor = tiny_safety_checker()   # a StableDiffusionSafetyChecker and its CLIPImageProcessor

Weights are seeded, so two builds give the same pipeline. The CLIP tokenizer is character-level (the 256 byte
symbols, with and without CLIP's end-of-word suffix): a real BPE tokenizer object built from a vocabulary and an
empty merge list, since transformers 5 ignores ``vocab_file=`` silently. The T5 tokenizer is character-level too: a
Unigram vocabulary of the printable ASCII characters, with and without SentencePiece's word-start mark.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def char_clip_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the byte symbols (plain and word-final): every text tokenizes."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))
    for symbol in _byte_symbols():
        vocab.setdefault(symbol + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _seeded(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_ddpm_pipeline(image_size: int = 16, channels: int = 3, seed: int = 0):
    """Unconditional pixel-space DDPM (random weights): a UNet2DModel and a DDPMScheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = _seeded(seed, lambda: UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"))


def tiny_sd_pipeline(seed: int = 0):
    """A StableDiffusionPipeline a few MB large: 32x32 images, 16x16x4 latents, no safety checker."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_clip_tokenizer()

    def build():
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=32))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
            sample_size=32)
        return text_encoder, unet, vae

    text_encoder, unet, vae = _seeded(seed, build)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sd15_shaped_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random weights in the shapes of Stable Diffusion 1.5: 860M UNet, CLIP ViT-L/14 text tower, 4-channel VAE;
    512x512 images. Only the tokenizer is character-level. For GPU throughput benchmarks, not for pictures."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_clip_tokenizer()

    def build():
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
            pad_token_id=1))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
        return text_encoder, unet, vae

    text_encoder, unet, vae = _seeded(seed, build)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(dtype=dtype)


def char_t5_tokenizer():
    """A T5 tokenizer (Unigram, no sentencepiece file) over printable ASCII, plain and word-initial ("▁a")."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline a few MB large, with a transformer denoiser (SD3Transformer2DModel, patch 2 on
    16x16x4 latents), two CLIP text towers, a T5 encoder and a flow-matching scheduler; 32x32 images."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer, t5_tokenizer = char_clip_tokenizer(), char_t5_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=32))

    def build():
        # joint_attention_dim = the T5 width = the two CLIP widths side by side; pooled = the two projections
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
            sample_size=32, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
            use_post_quant_conv=False)
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4))
        return clip(), clip(), t5, transformer, vae

    text_encoder, text_encoder_2, text_encoder_3, transformer, vae = _seeded(seed, build)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=char_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)


def tiny_pixart_sigma_pipeline(seed: int = 0):
    """A PixArtSigmaPipeline a few MB large: a PixArtTransformer2DModel (adaLN-single, learned variance: 8 output
    channels for 4 latent ones) on 16x16x4 latents, a T5 encoder as the only text model, a DPM-Solver; 32x32 images.
    Its sample size has no aspect-ratio bins: call it with use_resolution_binning=False (TextDiffusion does)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = char_t5_tokenizer()

    def build():
        transformer = PixArtTransformer2DModel(
            sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=32, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
            sample_size=32)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4))
        return t5, transformer, vae

    text_encoder, transformer, vae = _seeded(seed, build)
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def tiny_safety_checker(flag_everything: bool = False, seed: int = 0):
    """A StableDiffusionSafetyChecker on a tiny CLIP vision tower, and the CLIPImageProcessor that feeds it (32 px).
    Its concept thresholds are 1 (never reached by a cosine similarity: nothing is flagged), or -2 with
    ``flag_everything`` (always exceeded: every image is flagged and blacked out)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    checker = _seeded(seed, lambda: StableDiffusionSafetyChecker(config)).eval()
    if flag_everything:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, extractor
