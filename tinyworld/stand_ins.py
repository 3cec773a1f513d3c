"""A tiny, randomly initialised SD3 pipeline and CLIP model (and FLUX.1 and SANA pipelines), built offline in seconds.

They use exactly the classes of the real models (``StableDiffusion3Pipeline`` with ``SD3Transformer2DModel``,
a 16-channel ``AutoencoderKL``, two ``CLIPTextModelWithProjection`` encoders, ``CLIPModel`` for the reward), so
the loading, LoRA, rollout, reward and checkpoint code paths are the ones that run on real SD3. The weights are
random: images are noise-like and the CLIP reward is a fixed random function of (image, text). They stand in
until the trained tiny world ships (it replaces them as the quick-start default).

    python -m tinyworld.stand_ins --out assets/tiny-random [--sd35] [--flux] [--sana]
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import torch

# The OpenAI CLIP BPE vocabulary layout: 256 byte symbols, the same with an end-of-word marker, the merges, then
# the two special tokens. open_clip ships the merges file, so the tokenizer is the real CLIP one.
_N_MERGES = 49152 - 256 - 2


def clip_tokenizer(model_max_length: int = 77):
    """The OpenAI CLIP tokenizer (``transformers.CLIPTokenizer``) built from the vocabulary open_clip ships."""
    import open_clip
    from transformers import CLIPTokenizer

    from tinyworld.tokenizer import byte_symbols

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _N_MERGES + 1]]
    symbols = byte_symbols()  # GPT-2/CLIP's byte -> printable-unicode table, in vocabulary order
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = model_max_length
    return tok


def build_tiny_sd3(out: str | os.PathLike, seed: int = 0, text_len: int = 16, num_layers: int = 2,
                   dual_attention_layers: tuple[int, ...] = (), qk_norm: str | None = None) -> Path:
    """Write a complete, random, tiny ``StableDiffusion3Pipeline`` folder (no T5) and return its path.

    64 px images -> 16x16x16 latents (VAE downsamples 4x) -> 64 tokens of patch 2. ``dual_attention_layers`` and
    ``qk_norm`` are the two transformer arguments by which SD3.5 differs from SD3 (see ``build_tiny_sd35``).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_cfg = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, projection_dim=32, hidden_act="gelu")
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0, scaling_factor=1.0, sample_size=64,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer(text_len),
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(text_len),
        text_encoder_3=None, tokenizer_3=None,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def build_tiny_sd35(out: str | os.PathLike, seed: int = 0, text_len: int = 16) -> Path:
    """A tiny random SD3.5-medium-like pipeline: the same folder as ``build_tiny_sd3`` with SD3.5's transformer
    features, RMS q/k normalisation (``qk_norm="rms_norm"``, also in the joint attention's text branch) and a second,
    image-only attention (``attn2``) in the first blocks (``dual_attention_layers``; SD3.5-medium has it in blocks
    0-12 of 24, so here in blocks 0-1 of 3 and not in the last). SD3.5-large has qk_norm without dual attention."""
    return build_tiny_sd3(out, seed, text_len, num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")


def t5_tokenizer(words: tuple[str, ...] = ()) -> "T5Tokenizer":
    """A small T5 tokenizer (``transformers.T5Tokenizer``, a Unigram model laid out as T5's: <pad>, </s>, <unk>, then
    pieces): the letters and digits, each with and without the word-start marker, and whole ``words``; any other
    character is <unk>. Built offline, saved and loaded as the real T5 tokenizer is."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


TINY_WORDS = ("a", "an", "the", "of", "and", "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
              "circle", "circles", "square", "squares", "triangle", "triangles", "one", "two", "three", "left", "right",
              "top", "bottom", "above", "below", "photo", "cat", "dog")


def build_tiny_flux(out: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True, text_len: int = 16) -> Path:
    """Write a complete, random, tiny ``FluxPipeline`` folder and return its path: ``FluxTransformer2DModel``
    (1 double-stream and 1 single-stream block; with ``guidance_embeds`` the FLUX.1-dev layout, which takes the
    distilled guidance as an input, without it FLUX.1-schnell's), a 16-channel ``AutoencoderKL`` (4x down, as
    ``build_tiny_sd3``'s), ``CLIPTextModel`` (its pooled output conditions) and ``T5EncoderModel`` (the sequence)
    with their tokenizers, and FLUX's dynamically shifted ``FlowMatchEulerDiscreteScheduler``.

    64 px images -> 16x16x16 latents, packed into 64 tokens of 2x2x16 = 64 channels, as FLUX packs its latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu"))
    tokenizer_2 = t5_tokenizer(TINY_WORDS)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64,
                                             num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16), use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611, sample_size=64)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=clip_tokenizer(text_len), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def gemma_tokenizer() -> "GemmaTokenizer":
    """A character-level Gemma tokenizer (``transformers.GemmaTokenizer``: Gemma's specials, then one token per
    letter, digit, punctuation mark and the word-start marker, no merges), built offline, saved and loaded as the
    real one is. Characters outside it are <unk>."""
    from transformers import GemmaTokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-_/\n\u2581"
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *dict.fromkeys(chars)]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def build_tiny_sana(out: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete, random, tiny ``SanaPipeline`` folder and return its path: ``SanaTransformer2DModel`` (2
    blocks of linear self-attention and cross-attention), a ``Gemma2Model`` text encoder with a character-level
    Gemma tokenizer, an 8-channel ``AutoencoderDC`` (4x down; SANA's is 32x) and SANA's scheduler,
    ``DPMSolverMultistepScheduler`` with flow prediction and flow sigmas (shift 3).

    64 px images -> 8x16x16 latents -> 256 tokens of patch 1."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=4096))
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    vae = AutoencoderDC(
        in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        scaling_factor=0.41)
    transformer = SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        sample_size=16, patch_size=1)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def build_tiny_clip(out: str | os.PathLike, seed: int = 0, image_size: int = 64) -> Path:
    """Write a random tiny ``CLIPModel`` + ``CLIPProcessor`` folder, loadable like openai/clip-vit-large-patch14."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=clip_tokenizer(77),
    )
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_all(out: str | os.PathLike, seed: int = 0, sd35: bool = False, flux: bool = False,
              sana: bool = False) -> dict[str, Path]:
    """Build both tiny models under ``out`` (``sd3/`` and ``clip/``; with ``sd35`` also ``sd3.5/``, with ``flux``
    ``flux.1-dev/`` and ``flux.1-schnell/``, with ``sana`` ``sana/``)."""
    out = Path(out)
    built = {"sd3": build_tiny_sd3(out / "sd3", seed), "clip": build_tiny_clip(out / "clip", seed)}
    if sd35:
        built["sd3.5"] = build_tiny_sd35(out / "sd3.5", seed)
    if flux:
        built["flux.1-dev"] = build_tiny_flux(out / "flux.1-dev", seed)
        built["flux.1-schnell"] = build_tiny_flux(out / "flux.1-schnell", seed, guidance_embeds=False)
    if sana:
        built["sana"] = build_tiny_sana(out / "sana", seed)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/tiny-random", help="folder to write sd3/ and clip/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sd35", action="store_true", help="also write sd3.5/, a tiny random SD3.5-like pipeline")
    parser.add_argument("--flux", action="store_true", help="also write flux.1-dev/ and flux.1-schnell/ (FluxPipeline)")
    parser.add_argument("--sana", action="store_true", help="also write sana/ (SanaPipeline)")
    args = parser.parse_args()
    for name, path in build_all(args.out, args.seed, args.sd35, args.flux, args.sana).items():
        print(f"wrote tiny random {name} to {path}")


if __name__ == "__main__":
    main()
