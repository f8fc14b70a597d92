"""Tiny, randomly initialised SD3 and Qwen-Image-Edit pipelines built on this machine.

Nothing is downloaded: tokenizers are trained locally on a few sentences, every model is a few
layers wide, and the folders are written with `save_pretrained`, so a worker loads them through
exactly the path of a real hub checkpoint (`firm-rollout --tiny`, tests, benchmarks). They draw
noise, not pictures: they exercise sampling, rewards and the update, not image quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foundation.bpe import SPECIAL_TOKENS, train_bpe
from foundation.cache import build_once

TINY_VERSION = "2"
_CORPUS = [
    "a red square on a grey background",
    "a photo of a cat sitting on a blue chair",
    "make the square yellow and keep the background",
    "change the colour of the car to green",
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
    "the user's requirements while maintaining consistency with the original input where appropriate.",
    "system user assistant 0 1 2 3 4 5 6 7 8 9",
]


def _bpe(special: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges trained on the small corpus above."""
    return train_bpe(_CORPUS * 4, special, vocab_size, split_digits=False)


def _sd3_text(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, Any]:
    """Two small CLIP text encoders with projection, as SD3's first two encoders."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    special = {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 77}
    clip = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return {
        "text_encoder": CLIPTextModelWithProjection(clip),
        "tokenizer": CLIPTokenizer(vocab=vocab, merges=merges, **special),
        "text_encoder_2": CLIPTextModelWithProjection(clip),
        "tokenizer_2": CLIPTokenizer(vocab=vocab, merges=merges, **special),
    }


def _sd3_image_models() -> dict[str, Any]:
    """The SD3 transformer (joint attention over the two CLIPs' 64 features) and an 8x VAE."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return {"transformer": transformer, "vae": vae}


def build_tiny_sd3(path: Path, seed: int = 0) -> Path:
    """SD3 without its T5 encoder (the pipeline pads with zeros, as SD3 allows): 64 px images, 8x8 latents."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    vocab, merges = _bpe(["<|startoftext|>", "<|endoftext|>"], 600)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder_3=None,
        tokenizer_3=None,
        **_sd3_text(vocab, merges),
        **_sd3_image_models(),
    )
    pipe.save_pretrained(path)
    return path


def _qwen_text() -> dict[str, Any]:
    """A locally trained Qwen2 tokenizer, the Qwen2-VL processor and a two-layer Qwen2.5-VL encoder."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab, merges = _bpe(list(SPECIAL_TOKENS), 700)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=56 * 56
        ),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    ends = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    rope = {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}
    text_config = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2}
    text_config |= {"num_attention_heads": 2, "num_key_value_heads": 2, "rope_scaling": rope, "rope_theta": 1e6}
    config = Qwen2_5_VLConfig(
        text_config=text_config | ends,
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **ends,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    return {"text_encoder": text_encoder, "tokenizer": tokenizer, "processor": processor}


def _qwen_image_models() -> dict[str, Any]:
    """The Qwen-Image transformer and a 4x Qwen-Image VAE."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return {"transformer": transformer, "vae": vae}


def build_tiny_qwen_edit(path: Path, seed: int = 0) -> Path:
    """Qwen-Image-Edit with a two-layer Qwen2.5-VL text encoder: 64 px images, 16x16 latents."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    torch.manual_seed(seed)
    pipe = QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), **_qwen_text(), **_qwen_image_models())
    pipe.save_pretrained(path)
    return path


BUILDERS = {"sd3": build_tiny_sd3, "qwen_edit": build_tiny_qwen_edit}


def ensure_tiny_pipeline(cache_dir: Path, kind: str) -> Path:
    """The tiny pipeline `kind` in `cache_dir`, built on first use."""
    target = Path(cache_dir) / f"tiny-{kind.replace('_', '-')}-v{TINY_VERSION}"
    return build_once(target, "model_index.json", BUILDERS[kind])
