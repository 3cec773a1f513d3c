"""The tiny world's CLIP judge: a small ``transformers.CLIPModel`` trained contrastively on rendered pairs.

It sees every caption of the grammar (the judge, like real CLIP, is not held out of anything); its images are
fresh renders, disjoint from the evaluation renders by seed. Each step renders one image per sampled scene
(categories in equal shares) and scores it against the batch's captions plus ``negatives`` one-attribute
variants per image (``grammar.variants``: colour, shape, count, style, relation, swap), so the hard cases of the
evaluation are exactly what it trains on. Relation captions needed more: with a learnt layout probe (2,500
steps), then with a text margin added (2,500 steps), then with the probe on fixed axes (300 position-only
fine-tuning steps) they stayed at chance; initialising the vision position table with 2-D sine-cosine on top of
those reached 0.85 after 800 steps. So the trainer uses all three: sine-cosine positions, a layout probe on fixed
axes shared by both towers (``layout_targets``, ``LayoutAxes``), and a margin keeping each caption's text
embedding apart from its one-attribute variants'. The folder it writes (model + ``CLIPProcessor``) is loaded by
``sd3_adrpo.rewards.ClipScoreReward`` exactly like openai/clip-vit-large-patch14.

``evaluate_clip(path, n, seed)`` measures, per change type, how often the true caption outranks a one-attribute
negative on fresh renders.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .grammar import CATEGORIES, COLOURS, Scene, all_scenes, variants
from .render import render_batch
from .tokenizer import build_tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 64
# Quality gates: minimum ranking accuracy of the true caption against a one-attribute negative.
GATES = {"colour": 0.95, "shape": 0.95, "count": 0.80, "relation": 0.80, "swap": 0.80}
CHANGES = ("colour", "shape", "style", "count", "relation", "swap")


@dataclass
class ClipTrainConfig:
    steps: int = 2500
    batch_size: int = 64
    negatives: int = 6  # one-attribute variant captions per image
    hard_weight: float = 1.0  # weight of the own-negatives cross-entropy
    aux_weight: float = 1.0  # weight of the layout probe (see layout_targets); the probe is not saved
    text_margin: float = 0.9  # own negatives' text embeddings are pushed below this cosine to their caption's
    margin_weight: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0
    vision_width: int = 96
    vision_layers: int = 3
    text_width: int = 64
    text_layers: int = 3
    projection_dim: int = 64
    patch_size: int = 8
    sincos_positions: bool = True  # initialise the vision position table with 2-D sine-cosine (it is still learnt)
    fixed_probe: bool = True  # layout probe on fixed unit axes (LayoutAxes) rather than a learnt linear map
    probe_scale: float = 0.15


def make_clip(tokenizer, cfg: ClipTrainConfig):
    from transformers import CLIPConfig, CLIPModel

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=2 * cfg.text_width,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_width // 32),
                         max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu", **special),
        vision_config=dict(hidden_size=cfg.vision_width, intermediate_size=2 * cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=max(1, cfg.vision_width // 32),
                           image_size=IMAGE_SIZE, patch_size=cfg.patch_size, hidden_act="gelu"),
        projection_dim=cfg.projection_dim,
    )
    model = CLIPModel(config)
    if cfg.sincos_positions:
        # where a colour sits is what relations turn on; a ViT that must first learn its position table from a
        # 0.02-scale random start never did in 2,500 steps (relation captions stayed at chance)
        emb = model.vision_model.embeddings.position_embedding
        with torch.no_grad():
            emb.weight.copy_(sincos_positions(IMAGE_SIZE // cfg.patch_size, cfg.vision_width))
    return model


def sincos_positions(grid: int, width: int, amplitude: float = 0.5) -> torch.Tensor:
    """(1 + grid**2, width) 2-D sine-cosine position table (first row, the class token, zero): half the channels
    encode x, half y, at geometric frequencies."""
    quarter = width // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter) / max(1, quarter)))
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (xs.flatten(), ys.flatten()):
        angle = c[:, None] * freq[None, :] * (math.pi / grid)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)
    table = F.pad(table, (0, width - table.shape[1]))
    return amplitude * torch.cat([torch.zeros(1, width), table])


def make_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> normalised (B, 3, 64, 64), the arithmetic of the saved CLIPImageProcessor (its
    resize and crop are the identity at 64 px)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def _balanced_scenes(rng: np.random.Generator, n: int, by_category: dict[str, list[Scene]]) -> list[Scene]:
    cats = rng.integers(len(CATEGORIES), size=n)
    return [by_category[CATEGORIES[c]][rng.integers(len(by_category[CATEGORIES[c]]))] for c in cats]


def _pick_negatives(scene: Scene, k: int, rng: np.random.Generator) -> list[str]:
    """k variant captions: one of each changeable aspect first (so relation, count and swap are always present),
    then aspects drawn uniformly."""
    by_aspect: dict[str, list[Scene]] = {}
    for aspect, v in variants(scene):
        by_aspect.setdefault(aspect, []).append(v)
    aspects = sorted(by_aspect)
    order = list(rng.permutation(len(aspects)))[:k] + list(rng.integers(len(aspects), size=max(0, k - len(aspects))))
    out = []
    for a in order:
        options = by_aspect[aspects[a]]
        out.append(options[rng.integers(len(options))].to_text())
    return out


N_LAYOUT = 4 * len(COLOURS)


def layout_targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scene facts that a caption states and its image shows, per palette colour: present (0/1), object count / 4,
    and for position scenes its side along the relation axis (-1 for the object that is left/above, +1 for the
    other; the other axis and non-position scenes are masked). Both towers' embeddings regress them on the same
    fixed axes (``LayoutAxes``) during training. Contrast alone left relation captions at chance: a saddle where
    neither tower encodes "which colour is where" until the other does. Per-colour sides are order-free ("red left
    of blue" and "blue right of red" agree), which a single "left" direction would not be."""
    n = len(COLOURS)
    targets = np.zeros((len(scenes), N_LAYOUT), dtype=np.float32)
    mask = np.zeros_like(targets)
    mask[:, :2 * n] = 1
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            c = COLOURS.index(obj.colour)
            targets[b, c], targets[b, n + c] = 1, obj.count / 4
        if scene.relation is not None:
            axis = 0 if scene.relation in ("left of", "right of") else 1
            first = -1.0 if scene.relation in ("left of", "above") else 1.0
            for obj, side in zip(scene.objects, (first, -first)):
                k = 2 * n + 2 * COLOURS.index(obj.colour) + axis
                targets[b, k], mask[b, k] = side, 1
    return torch.from_numpy(targets), torch.from_numpy(mask)


class LayoutAxes(torch.nn.Module):
    """The layout probe: fixed orthonormal axes of the embedding space (seeded, not learnt), read in units of
    ``scale``. A learnt linear probe can read a fact from a component too small to move a cosine; fixed unit axes
    make each fact a share of about ``scale`` of the unit-norm embedding, so it counts in the contrastive score."""

    def __init__(self, dim: int, n: int = N_LAYOUT, scale: float = 0.15, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, n, generator=g))
        self.register_buffer("axes", q.T.contiguous())  # (n, dim), orthonormal rows
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ self.axes.T / self.scale


def clip_loss(model, tokenizer, images: np.ndarray, captions: list[str], negatives: list[list[str]],
              hard_weight: float = 1.0, probe=None, layout=None, aux_weight: float = 1.0,
              text_margin: float | None = None, margin_weight: float = 1.0):
    """Symmetric in-batch InfoNCE, with each image also contrasted against all negative captions of the batch,
    plus ``hard_weight`` times a cross-entropy of each image over its own caption and its own one-attribute
    negatives only (in the big softmax these few are drowned out, and a bag-of-words model can ignore relations).
    Duplicate captions in a batch are not counted as negatives of each other's images."""
    texts = list(dict.fromkeys(captions + [c for negs in negatives for c in negs]))
    index = {t: i for i, t in enumerate(texts)}
    tok = tokenizer(texts, padding=True, return_tensors="pt")
    img = F.normalize(model.get_image_features(pixel_values=pixels(images)).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(**tok).pooler_output, dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, T)
    target = torch.tensor([index[c] for c in captions])
    loss_i2t = F.cross_entropy(logits, target)
    # text -> image over the batch images; an image whose caption equals the target one is not a negative
    cap = logits[:, target].T  # (B captions, B images)
    same = target[:, None] == target[None, :]
    cap = cap.masked_fill(same & ~torch.eye(len(captions), dtype=torch.bool), float("-inf"))
    loss_t2i = F.cross_entropy(cap, torch.arange(len(captions)))
    own = torch.tensor([[index[c]] + [index[n] for n in negs] for c, negs in zip(captions, negatives)])
    loss_hard = F.cross_entropy(logits.gather(1, own), torch.zeros(len(captions), dtype=torch.long))
    loss = (loss_i2t + loss_t2i) / 2 + hard_weight * loss_hard
    if text_margin is not None:
        # the text side of the saddle: a caption and its one-attribute variant must not embed alike, else no
        # gradient ever reaches the image tower for that attribute (relations sat at cosine 0.9999 without this)
        cos = (txt[own[:, :1]] * txt[own[:, 1:]]).sum(-1)
        loss = loss + margin_weight * F.relu(cos - text_margin).mean()
    if probe is not None:
        # the two groups of facts are averaged separately: relations (one entry, a quarter of the images) would
        # otherwise weigh ~2% of the probe loss and stay unlearnt
        facts, mask = layout
        groups = torch.zeros(facts.shape[1], dtype=torch.bool)
        groups[2 * len(COLOURS):] = True
        for emb in (img, txt[target]):
            error = (probe(emb) - facts) ** 2 * mask
            for g in (~groups, groups):
                loss = loss + aux_weight * error[:, g].sum() / mask[:, g].sum().clamp(min=1)
    return loss


def train_clip(out: str | Path, cfg: ClipTrainConfig, progress: bool = True, log_every: int = 100,
               save_every: int = 0) -> dict:
    """Train the tiny CLIP and save it (with its processor) to ``out``, also every ``save_every`` steps (0: only
    at the end) so a long run can be stopped early; returns a summary dict."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 101])
    tokenizer = build_tokenizer()
    model = make_clip(tokenizer, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    probe = None
    if cfg.aux_weight > 0:
        probe = (LayoutAxes(cfg.projection_dim, scale=cfg.probe_scale, seed=cfg.seed) if cfg.fixed_probe
                 else torch.nn.Linear(cfg.projection_dim, N_LAYOUT))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    no_decay += list(probe.parameters()) if probe is not None else []
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    by_category = {c: [s for s in all_scenes() if s.category == c] for c in CATEGORIES}
    out = Path(out)

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        make_processor(tokenizer).save_pretrained(out)

    model.train()
    start, losses, curve = time.time(), [], []
    for step in tqdm(range(cfg.steps), desc="clip", disable=not progress, mininterval=5):
        scenes = _balanced_scenes(rng, cfg.batch_size, by_category)
        # training renders use seeds >= 10**6 + ..., evaluation uses small seeds: disjoint images
        images = render_batch(scenes, seed=10**6 + cfg.seed * 10**5 + step)
        captions = [s.to_text() for s in scenes]
        negatives = [_pick_negatives(s, cfg.negatives, rng) for s in scenes]
        layout = layout_targets(scenes) if probe is not None else None
        loss = clip_loss(model, tokenizer, images, captions, negatives, cfg.hard_weight, probe, layout, cfg.aux_weight,
                         cfg.text_margin, cfg.margin_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, float(np.mean(losses[-log_every:]))))
            if progress:
                tqdm.write(f"clip step {step + 1}: loss {curve[-1][1]:.4f} ({time.time() - start:.0f}s)")
        if save_every and (step + 1) % save_every == 0:
            model.eval()
            save()
            model.train()
    model.eval()
    save()
    return {"params": n_params, "steps": cfg.steps, "wall_s": time.time() - start,
            "final_loss": float(np.mean(losses[-min(len(losses), log_every):])), "loss_curve": curve,
            "config": asdict(cfg)}


@torch.no_grad()
def evaluate_clip(path: str | Path, n: int = 500, seed: int = 0) -> dict:
    """Per change type, the fraction of ``n`` fresh renders (seed ``seed``) for which the saved CLIP at ``path``
    scores the true caption above a random one-attribute negative of that type. Loaded through
    ``ClipScoreReward``, the project's own reward loader. Returns {change: accuracy} plus "n"."""
    from sd3_adrpo.rewards import ClipScoreReward

    reward = ClipScoreReward(str(path))
    rng = np.random.default_rng([seed, 7])
    scenes = all_scenes()
    result: dict = {}
    for k, change in enumerate(CHANGES):
        pool = [s for s in scenes if any(a == change for a, _ in variants(s))]
        picked = [pool[i] for i in rng.integers(len(pool), size=n)]
        negs = []
        for s in picked:
            options = [v for a, v in variants(s) if a == change]
            negs.append(options[rng.integers(len(options))].to_text())
        images = render_batch(picked, seed=seed * 100 + k)
        true = reward(images, [s.to_text() for s in picked])
        false = reward(images, negs)
        result[change] = float(np.mean(np.asarray(true) > np.asarray(false)))
    result["n"] = n
    return result


def gate_failures(result: dict) -> list[str]:
    """The change types below their quality gate (empty when all pass)."""
    return [f"{c} {result[c]:.3f} < {g}" for c, g in GATES.items() if result[c] < g]
