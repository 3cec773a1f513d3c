"""A compact BLIP (ViT image encoder + the "med" BERT text encoder with cross-attention) for scoring only.

Module and parameter names follow the original checkpoints, so ``ImageReward.pt`` (keys ``blip.*``, ``mlp.*``) and
BLIP's pre-train ``model_large.pth`` (its ``model`` entry, ``visual_encoder.*``, ``text_encoder.*``, ...) load with
``strict=True``:

    visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
                    mlp.fc2}, norm}
    text_encoder.embeddings.{word_embeddings, position_embeddings, LayerNorm, position_ids}
    text_encoder.encoder.layer.N.{attention, crossattention}.{self.{query, key, value}, output.{dense, LayerNorm}}
    text_encoder.encoder.layer.N.{intermediate.dense, output.dense, output.LayerNorm}
    vision_proj, text_proj

Sizes are configurable (``VisionConfig``; the text side reads a med_config-like dict) so tests run tiny models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# BLIP's configs/med_config.json (bert-base sizes, vocab of bert-base-uncased + [DEC] + [ENC]); encoder_width is
# overridden by the vision width, as BLIP does.
MED_CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  vocab_size=30524, max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0,
                  hidden_act="gelu", encoder_width=768, add_cross_attention=True)
VIT_PRESETS = {"base": dict(width=768, depth=12, heads=12), "large": dict(width=1024, depth=24, heads=16)}
EMBED_DIM = 256  # BLIP's ITC projection size
_MASKED = -10000.0  # BLIP's additive attention mask value


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @classmethod
    def make(cls, vision: str | dict | "VisionConfig" = "large", image_size: int = 224) -> "VisionConfig":
        if isinstance(vision, VisionConfig):
            return vision
        if isinstance(vision, str):
            if vision not in VIT_PRESETS:
                raise ValueError(f"unknown BLIP ViT {vision!r}; available: {', '.join(VIT_PRESETS)} or a dict")
            return cls(image_size=image_size, **VIT_PRESETS[vision])
        return cls(**{"image_size": image_size, **vision})


@dataclass
class TextConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30524
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    encoder_width: int = 768
    add_cross_attention: bool = True

    @classmethod
    def make(cls, med_config: Optional[str | os.PathLike | dict], encoder_width: int) -> "TextConfig":
        """From a med_config.json path or dict (unknown keys ignored); ``encoder_width`` = the vision width."""
        if med_config is None:
            med_config = MED_CONFIG
        elif not isinstance(med_config, dict):
            med_config = json.loads(open(med_config).read())
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in med_config.items() if k in known}, "encoder_width": encoder_width})


# ---- vision: a timm-style ViT (pre-norm blocks, cls token, learned positions, final LayerNorm) ----

class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VitAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class VitMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, int(cfg.width * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.width * cfg.mlp_ratio), cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.width, eps=cfg.eps), VitAttention(cfg)
        self.norm2, self.mlp = nn.LayerNorm(cfg.width, eps=cfg.eps), VitMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width))
        self.blocks = nn.ModuleList(VitBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, 1 + patches, width) token embeddings, [CLS] first."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---- text: BLIP's "med" BERT (post-norm layers; self-attention, optional cross-attention to the image) ----

class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings (no token types in BLIP's med BERT), LayerNorm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # persistent, as in med.py, so it is part of the original state dicts
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids[:, : input_ids.shape[1]]
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, cross: bool):
        super().__init__()
        self.heads = cfg.num_attention_heads
        kv_width = cfg.encoder_width if cross else cfg.hidden_size
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, additive_mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        return out.transpose(1, 2).flatten(2)


class BertSelfOutput(nn.Module):
    """dense -> residual -> LayerNorm; BERT's ``output`` of an attention block and of the feed-forward block."""

    def __init__(self, cfg: TextConfig, in_size: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(in_size or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, cross: bool = False):
        super().__init__()
        self.self = BertSelfAttention(cfg, cross)
        self.output = BertSelfOutput(cfg)

    def forward(self, x, context, additive_mask):
        return self.output(self.self(x, context, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        if cfg.add_cross_attention:
            self.crossattention = BertAttention(cfg, cross=True)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, in_size=cfg.intermediate_size)

    def forward(self, x, mask, image_embeds=None):
        x = self.attention(x, x, mask)
        if image_embeds is not None:  # every image token is attended to (an all-ones encoder mask)
            x = self.crossattention(x, image_embeds, None)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """BLIP's text encoder (``add_pooling_layer=False``): text-only mode without ``image_embeds``, else multimodal
    (cross-attention to the image tokens in every layer)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> last hidden state (B, L, hidden); ``attention_mask`` is 1 for tokens, 0 for padding."""
        if image_embeds is not None and not self.cfg.add_cross_attention:
            raise ValueError("this text encoder has no cross-attention (add_cross_attention=false in its config)")
        x = self.embeddings(input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * _MASKED
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class BLIP(nn.Module):
    """BLIP's image and text encoders with their ITC projections (the scoring part of ``BLIP_Pretrain``)."""

    def __init__(self, vision: VisionConfig, text: TextConfig, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.visual_encoder = VisionTransformer(vision)
        self.text_encoder = BertModel(text)
        self.vision_proj = nn.Linear(vision.width, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Unit ITC image features from the image [CLS]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit ITC text features from the text [CLS] of the text-only encoder."""
        return F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)[:, 0]), dim=-1)


def fill_position_ids(state_dict: dict, model: nn.Module) -> dict:
    """Add the deterministic ``position_ids`` buffers a checkpoint may lack (some savers drop them)."""
    own = model.state_dict()
    return {**{k: v for k, v in own.items() if k.endswith("embeddings.position_ids") and k not in state_dict},
            **state_dict}


def blip_tokenizer(tokenizer: str | os.PathLike):
    """bert-base-uncased (hub id or local folder) with BLIP's added tokens: ``[DEC]`` as bos, ``[ENC]`` extra."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(tokenizer))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok
