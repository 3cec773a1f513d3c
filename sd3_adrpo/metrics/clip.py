"""The CLIP family: ClipScore (and the unclamped ``clip`` reward), open_clip's CLIP score, PickScore, the LAION
aesthetic predictor and HPSv2 (definitions: README, "Evaluation")."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from sd3_adrpo.metrics.base import (OPENAI_MEAN, OPENAI_STD, LinearHead, Metric, as_uint8_images, batches,
                                    load_pretrained, pixels, register_metric, resolve_weights, torch_load)

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (embedding in pooler_output); 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clip_scores(img_emb: torch.Tensor, txt_emb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """ClipScore per pair: 100 * cos(image, text), clamped at 0 (the torchmetrics definition) unless ``clamp`` is
    false (the training reward: a negative cosine still ranks)."""
    score = 100 * F.cosine_similarity(img_emb, txt_emb, dim=-1)
    return score.clamp(min=0) if clamp else score


class _ClipEmbeddings:
    """Raw (unnormalised) embeddings of a transformers ``CLIPModel`` and its ``CLIPProcessor`` (``self.model``,
    ``self.processor``), ``batch_size`` at a time, float32 on ``self.device``: what ClipScore and PickScore share."""

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """(B, D) image embeddings."""
        images = as_uint8_images(images)
        out = []
        for s in batches(len(images), self.batch_size):
            px = self.processor(images=list(images[s]), return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_embedding(self.model.get_image_features(pixel_values=px)).float())
        return torch.cat(out) if out else torch.zeros(0, self.projection_dim, device=self.device)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """(B, D) text embeddings, each prompt cut at the text model's context (77 tokens for CLIP)."""
        context = min(self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        out = []
        for s in batches(len(prompts), self.batch_size):
            tok = self.processor.tokenizer(prompts[s], padding=True, truncation=True, max_length=context,
                                           return_tensors="pt")
            out.append(_embedding(self.model.get_text_features(**tok.to(self.device))).float())
        return torch.cat(out) if out else torch.zeros(0, self.projection_dim, device=self.device)


@register_metric("clip_score")
class ClipScore(_ClipEmbeddings, Metric):
    """100 * cos(image, text) with a transformers ``CLIPModel`` (hub id, e.g. openai/clip-vit-large-patch14, or a
    local folder) and its ``CLIPProcessor``, clamped at 0 per pair (``clip_scores``). The project's one CLIP score:
    the ``clip`` reward, the evaluation's ClipScore and ClipDiversity (``embed_images``) and the aesthetic predictor's
    image embedding all come from here."""

    clamp = True

    def __init__(self, weights: str = CLIP_L14, device: torch.device | str = "cpu", batch_size: int = 64):
        from transformers import CLIPModel, CLIPProcessor

        expects = f"a CLIPModel hub id (e.g. {CLIP_L14}) or a local folder with the model and its processor"
        weights = resolve_weights(weights, self.name or "clip_score", expects)
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = load_pretrained(lambda w: CLIPModel.from_pretrained(w, dtype=torch.float32), weights,
                                     self.name or "clip_score", expects).to(self.device).eval().requires_grad_(False)
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, weights, self.name or "clip_score", expects)

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        as_uint8_images(images, prompts)
        return clip_scores(self.embed_images(images), self.embed_texts(prompts), self.clamp).double().cpu().numpy()


@register_metric("clip")
class ClipScoreReward(ClipScore):
    """The CLIP score as the default training reward: ``clip_score`` without the clamp at 0 (a reward need not)."""

    clamp = False


@register_metric("open_clip")
class OpenClipScore(Metric):
    """100 * cos(image, text) with an open_clip model: ``weights`` is its architecture name (e.g. ViT-L-14) and
    ``pretrained`` a tag (e.g. openai, laion2b_s32b_b82k) or a local weights file. Not clamped (a reward)."""

    def __init__(self, weights: str = "ViT-L-14", device: torch.device | str = "cpu", pretrained: Optional[str] = None,
                 batch_size: int = 64):
        import open_clip

        self.device, self.batch_size = torch.device(device), batch_size
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            weights, pretrained=pretrained, device=self.device, weights_only=True)  # never unpickle arbitrary objects
        self.model.float().eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(weights)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        images = as_uint8_images(images, prompts)
        out = []
        for s in batches(len(images), self.batch_size):
            img = self.model.encode_image(pixels(images[s], self.preprocess).to(self.device)).float()
            txt = self.model.encode_text(self.tokenizer(prompts[s]).to(self.device)).float()
            out.append(clip_scores(img, txt, clamp=False))
        return torch.cat(out).double().cpu().numpy()


@register_metric("pickscore")
class PickScore(_ClipEmbeddings, Metric):
    """exp(logit_scale) * cos(image, text), raw (neither divided nor softmaxed), with a transformers CLIPModel (the
    embeddings ClipScore computes; not a ClipScore: it never takes the reward's CLIP as its weights).

    ``processor``: where the CLIPProcessor comes from; by default the weights' own folder when it has one, else the
    LAION ViT-H-14 processor PickScore was trained with."""

    def __init__(self, weights: str = PICKSCORE, device: torch.device | str = "cpu", processor: Optional[str] = None,
                 batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        expects = f"a CLIPModel hub id (e.g. {PICKSCORE}) or a local folder"
        weights = resolve_weights(weights, "pickscore", expects)
        if processor is None:
            own = any(os.path.isfile(os.path.join(weights, f)) for f in ("preprocessor_config.json",
                                                                           "processor_config.json"))
            processor = weights if own else PICKSCORE_PROCESSOR
        processor = resolve_weights(processor, "pickscore", f"processor= a CLIPProcessor hub id (e.g. "
                                                            f"{PICKSCORE_PROCESSOR}) or a local folder")
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = load_pretrained(lambda w: CLIPModel.from_pretrained(w, dtype=torch.float32), weights,
                                     "pickscore", expects).to(self.device).eval().requires_grad_(False)
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, processor, "pickscore",
                                         f"processor= a CLIPProcessor hub id or folder (e.g. {PICKSCORE_PROCESSOR})")

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        as_uint8_images(images, prompts)
        img = F.normalize(self.embed_images(images), dim=-1)
        txt = F.normalize(self.embed_texts(prompts), dim=-1)
        return (self.model.logit_scale.exp().float() * (img * txt).sum(-1)).double().cpu().numpy()


@register_metric("aesthetic")
class Aesthetic(Metric):
    """LAION improved aesthetic predictor v2: ``LinearHead`` on the L2-normalised CLIP ViT-L/14 image embedding.

    ``weights``: the head file (sac+logos+ava1-l14-linearMSE.pth); ``clip``: the CLIP it was trained on."""

    def __init__(self, weights: str, device: torch.device | str = "cpu", clip: str = CLIP_L14, batch_size: int = 64):
        path = resolve_weights(weights, "aesthetic", "the head file sac+logos+ava1-l14-linearMSE.pth (a local .pth)",
                               allow_hub=False)
        self.device = torch.device(device)
        state = torch_load(path, "aesthetic")
        dim = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768
        self.head = LinearHead(dim)
        self.head.load_state_dict(state, strict=True)
        self.head.to(self.device).float().eval().requires_grad_(False)
        self.clip = ClipScore(clip, device=device, batch_size=batch_size)
        if self.clip.projection_dim != dim:
            model = " ViT-L/14" if dim == 768 else ""
            raise ValueError(f"aesthetic: the head takes {dim}-d CLIP{model} image embeddings but {clip!r} gives "
                             f"{self.clip.projection_dim}-d; pass clip={CLIP_L14!r} (or a local copy)")

    @torch.no_grad()
    def score_embeddings(self, img_emb: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(img_emb.float(), dim=-1).to(self.device))

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        as_uint8_images(images, prompts)  # prompts are not used, only checked
        return self.score_embeddings(self.clip.embed_images(images)).double().cpu().numpy()


class _ResizeLongestPad:
    """HPSv2's validation transform: resize the longest edge to ``size`` (bicubic), pad to a centred square with 0."""

    def __init__(self, size: int):
        from torchvision import transforms as T

        self.size, self.T = size, T
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        w, h = img.size
        scale = self.size / max(h, w)
        if scale != 1.0:
            img = TF.resize(img, [round(h * scale), round(w * scale)], self.T.InterpolationMode.BICUBIC)
        w, h = img.size
        pw, ph = self.size - w, self.size - h
        img = TF.pad(img, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        return self.to_tensor(img)


@register_metric("hpsv2")
class HPSv2(Metric):
    """Human Preference Score v2/v2.1: cos(image, text) of an open_clip ViT-H-14 with the HPS checkpoint loaded, as
    the HPSv2 toolkit scores (the diagonal of normalised image @ text features; no scaling)."""

    def __init__(self, weights: str, device: torch.device | str = "cpu", arch: str = "ViT-H-14",
                 batch_size: int = 32):
        import open_clip

        path = resolve_weights(weights, "hpsv2", "the HPS checkpoint file (HPS_v2_compressed.pt or "
                                                 "HPS_v2.1_compressed.pt from xswu/HPSv2)", allow_hub=False)
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = open_clip.create_model(arch, pretrained=path, weights_only=True)  # accepts {'state_dict': ...}
        self.model.to(self.device).float().eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.transform = _ResizeLongestPad(size[0] if isinstance(size, (tuple, list)) else size)

    @torch.no_grad()
    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        images = as_uint8_images(images, prompts)
        out = []
        for s in batches(len(images), self.batch_size):
            img = self.model.encode_image(pixels(images[s], self.transform).to(self.device), normalize=True)
            txt = self.model.encode_text(self.tokenizer(prompts[s]).to(self.device), normalize=True)
            out.append((img.float() * txt.float()).sum(-1))
        return torch.cat(out).double().cpu().numpy()
