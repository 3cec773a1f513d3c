"""ImageReward and BLIPScore on the BLIP port of ``sd3_adrpo.metrics.blip``, scored as the ImageReward toolkit does.

Both tokenise with bert-base-uncased (+ BLIP's [DEC]/[ENC]) padded to 35 tokens with the text's own [CLS] first, and
preprocess images by a bicubic shortest-edge resize to 224, a centre crop and the OpenAI CLIP mean/std.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from sd3_adrpo.metrics.base import (LinearHead, Metric, as_uint8_images, batches, clip_style_transform,
                                    load_pretrained, pixels, register_metric, repo_file, resolve_weights, torch_load)
from sd3_adrpo.metrics.blip import BLIP, TextConfig, VisionConfig, blip_tokenizer, fill_position_ids

IMAGE_REWARD = "THUDM/ImageReward"
BERT = "bert-base-uncased"
MAX_LENGTH = 35
# ImageReward's normalisation of the MLP output (ImageReward.py: self.mean, self.std)
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
# Entries of BLIP's pre-train checkpoint that scoring does not use: momentum encoders, ITM head, LM decoder, queues.
PRETRAIN_ONLY = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "itm_head.",
                 "text_decoder.", "temp", "image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue")
SCORING = ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.")


class ImageRewardModel(nn.Module):
    """``blip`` + ``mlp``: the module layout of ImageReward's ``ImageReward`` class (keys ``blip.*``, ``mlp.*``)."""

    def __init__(self, vision: VisionConfig, text: TextConfig):
        super().__init__()
        self.blip = BLIP(vision, text)
        self.mlp = LinearHead(text.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.blip.visual_encoder(pixel_values)
        cls = self.blip.text_encoder(input_ids, attention_mask, image_embeds=image_embeds)[:, 0]
        return (self.mlp(cls.float()) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


class _BlipMetric(Metric):
    """Shared: tokenizer, preprocessing, batching. Subclasses set ``self.model`` and implement ``score``."""

    def _setup(self, device, tokenizer, vision: VisionConfig, text: TextConfig, batch_size: int):
        self.device, self.batch_size = torch.device(device), batch_size
        tok_expects = f"tokenizer= a bert-base-uncased hub id ({BERT}) or a local folder with its tokenizer files"
        self.tokenizer = load_pretrained(blip_tokenizer, resolve_weights(tokenizer, self.name, tok_expects),
                                         self.name, tok_expects)
        if len(self.tokenizer) != text.vocab_size:
            raise ValueError(f"{self.name}: the tokenizer has {len(self.tokenizer)} tokens with [DEC]/[ENC] but the "
                             f"text encoder {text.vocab_size}; pass the bert-base-uncased tokenizer")
        self.transform = clip_style_transform(vision.image_size)

    def _finish(self, model: nn.Module, state_dict: dict, source: str):
        try:
            model.load_state_dict(fill_position_ids(state_dict, model), strict=True)
        except RuntimeError as e:
            raise RuntimeError(f"{self.name}: {source} does not match the configured model: {e}") from e
        self.model = model.to(self.device).float().eval().requires_grad_(False)

    def _tokens(self, prompts: list[str]):
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        images = as_uint8_images(images, prompts)
        out = [self.score(pixels(images[s], self.transform).to(self.device), self._tokens(prompts[s]))
               for s in batches(len(images), self.batch_size)]
        return torch.cat(out).double().cpu().numpy()


@register_metric("image_reward")
class ImageReward(_BlipMetric):
    """(MLP on the text [CLS] of BLIP's text encoder with cross-attention to the image - mean) / std.

    ``weights``: hub id (THUDM/ImageReward), a folder with ImageReward.pt + med_config.json, or the .pt file itself
    (med_config.json beside it, or ``med_config=`` a path or dict). ``vision``: "large" (ImageReward's ViT-L/16) or
    a dict of ``VisionConfig`` fields."""

    def __init__(self, weights: str = IMAGE_REWARD, device: torch.device | str = "cpu", tokenizer: str = BERT,
                 med_config: Optional[str | dict] = None, vision: str | dict = "large", image_size: int = 224,
                 batch_size: int = 32):
        expects = (f"a hub id ({IMAGE_REWARD}), a folder with ImageReward.pt and med_config.json, or the path of "
                   f"ImageReward.pt")
        ckpt = repo_file(weights, "ImageReward.pt", self.name, expects)
        if med_config is None:
            beside = ckpt.parent / "med_config.json"
            if beside.is_file():
                med_config = beside
            elif os.path.isfile(os.path.expanduser(weights)):
                raise FileNotFoundError(f"{self.name}: no med_config.json beside {str(ckpt)!r}; pass med_config= its "
                                        f"path (from the {IMAGE_REWARD} hub repo) or put it beside the checkpoint")
            else:
                med_config = repo_file(weights, "med_config.json", self.name, expects)
        vision = VisionConfig.make(vision, image_size)
        text = TextConfig.make(med_config, encoder_width=vision.width)
        self._setup(device, tokenizer, vision, text, batch_size)
        self._finish(ImageRewardModel(vision, text), torch_load(ckpt, self.name), str(ckpt))

    def score(self, pixel_values: torch.Tensor, tok) -> torch.Tensor:
        return self.model(pixel_values, tok["input_ids"], tok["attention_mask"])


@register_metric("blip_score")
class BlipScore(_BlipMetric):
    """cos(vision_proj(image [CLS]), text_proj(text [CLS], text-only encoder)): BLIP's ITC similarity, as the
    ImageReward toolkit's BLIPScore computes it.

    ``weights``: BLIP's pre-train checkpoint (model_large.pth; its ``model`` entry is the state dict). The momentum
    encoders, ITM head, decoder and queues in it are dropped; everything scoring uses is loaded strictly."""

    def __init__(self, weights: str, device: torch.device | str = "cpu", tokenizer: str = BERT,
                 med_config: Optional[str | dict] = None, vision: str | dict = "large", image_size: int = 224,
                 batch_size: int = 32):
        path = resolve_weights(weights, self.name, "BLIP's pre-train checkpoint model_large.pth (a local file, from "
                                                   "https://storage.googleapis.com/sfr-vision-language-research/BLIP/"
                                                   "models/model_large.pth)", allow_hub=False)
        vision = VisionConfig.make(vision, image_size)
        text = TextConfig.make(med_config, encoder_width=vision.width)
        self._setup(device, tokenizer, vision, text, batch_size)
        ckpt = torch_load(path, self.name)
        state = ckpt.get("model", ckpt)
        unknown = [k for k in state if not k.startswith(SCORING + PRETRAIN_ONLY)]
        if unknown:
            raise RuntimeError(f"{self.name}: {path!r} has entries that are not BLIP pre-train ones: {unknown[:8]}")
        self._finish(BLIP(vision, text), {k: v for k, v in state.items() if k.startswith(SCORING)}, path)

    def score(self, pixel_values: torch.Tensor, tok) -> torch.Tensor:
        img = self.model.image_features(self.model.visual_encoder(pixel_values))
        txt = self.model.text_features(tok["input_ids"], tok["attention_mask"])
        return (img * txt).sum(-1)
