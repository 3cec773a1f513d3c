"""Rewards: small classes behind a name registry. Each maps (uint8 images (B, H, W, 3), prompts) -> rewards (B,).

Images are scored as the uint8 pixels a user would see, each model with its own preprocessing.

Add a reward:

    @register_reward("my_reward")
    class MyReward(Reward):
        def __init__(self, model: str, device, **kwargs): ...
        def __call__(self, images, prompts): return torch.tensor([...])
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

REWARDS: dict[str, type["Reward"]] = {}


def register_reward(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = cls
        return cls

    return wrap


class Reward:
    """Base class: ``__call__(images_uint8, prompts) -> float tensor (B,)`` on CPU."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


def build_reward(name: str, model: str, device: torch.device | str = "cpu", pretrained: Optional[str] = None) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](model, device=device, pretrained=pretrained)


def _as_uint8_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"rewards take uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (embedding in pooler_output); 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@register_reward("clip")
class ClipScoreReward(Reward):
    """100 * cos(image, text) with a transformers ``CLIPModel`` (hub id, e.g. openai/clip-vit-large-patch14, or a
    local folder) and its ``CLIPProcessor``. Not clamped at 0 (the ClipScore *metric* clamps; a reward need not)."""

    def __init__(self, model: str, device: torch.device | str = "cpu", pretrained: Optional[str] = None,
                 batch_size: int = 64):
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.batch_size = torch.device(device), batch_size
        self.model = CLIPModel.from_pretrained(model).to(self.device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(model)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        pixels = self.processor(images=list(_as_uint8_numpy(images)), return_tensors="pt")["pixel_values"]
        return _embedding(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _embedding(self.model.get_text_features(**tok)).float()

    def __call__(self, images, prompts: list[str]) -> torch.Tensor:
        scores = []
        for s in range(0, len(prompts), self.batch_size):
            img = self.embed_images(images[s : s + self.batch_size])
            txt = self.embed_texts(prompts[s : s + self.batch_size])
            scores.append(100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1))
        return torch.cat(scores).cpu()


@register_reward("open_clip")
class OpenClipScoreReward(Reward):
    """100 * cos(image, text) with an open_clip model: ``model`` is its architecture name (e.g. ViT-L-14) and
    ``pretrained`` a tag (e.g. openai, laion2b_s32b_b82k) or a local weights file."""

    def __init__(self, model: str, device: torch.device | str = "cpu", pretrained: Optional[str] = None,
                 batch_size: int = 64):
        import open_clip

        self.device, self.batch_size = torch.device(device), batch_size
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=self.device, weights_only=True)  # never unpickle arbitrary objects
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> torch.Tensor:
        from PIL import Image

        images = _as_uint8_numpy(images)
        scores = []
        for s in range(0, len(prompts), self.batch_size):
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[s : s + self.batch_size]])
            img = self.model.encode_image(pixels.to(self.device)).float()
            txt = self.model.encode_text(self.tokenizer(prompts[s : s + self.batch_size]).to(self.device)).float()
            scores.append(100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1))
        return torch.cat(scores).cpu()
