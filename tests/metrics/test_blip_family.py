"""ImageReward and BLIPScore on tiny random BLIPs whose checkpoints use the ORIGINAL key names.

The expected keys and shapes below are facts about the original modules (ImageReward's ``ImageReward`` = ``blip``
(BLIP_Pretrain: visual_encoder, text_encoder, vision_proj, text_proj) + ``mlp``; BLIP's timm-style ViT; BLIP's
med.py BERT without pooler, with cross-attention in every layer) for a 1-block ViT (width 48, 2 heads, patch 16,
32 px) and a 1-layer text encoder (hidden 32, 2 heads, intermediate 64, 16 tokens, 40 positions). Scores are
checked against references computed here from the raw state dict: timm's VisionTransformer for the image side and
BERT's equations written out for the text side.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sd3_adrpo.metrics import build_metric

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VISION = dict(width=48, depth=1, heads=2, patch_size=16, image_size=32)
MED = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=16,
           max_position_embeddings=40, layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu", encoder_width=999,
           add_cross_attention=True)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "cat", "two", "green",
         "##s"]  # + [DEC], [ENC] added by BLIP's tokenizer setup = 16
PROMPTS = ["a red circle", "two green squares", "a blue cat", "a cat"]

_V, _T = "blip.visual_encoder.", "blip.text_encoder."
_L = _T + "encoder.layer.0."
BLIP_SHAPES = {
    _V + "cls_token": (1, 1, 48), _V + "pos_embed": (1, 5, 48),
    _V + "patch_embed.proj.weight": (48, 3, 16, 16), _V + "patch_embed.proj.bias": (48,),
    _V + "blocks.0.norm1.weight": (48,), _V + "blocks.0.norm1.bias": (48,),
    _V + "blocks.0.attn.qkv.weight": (144, 48), _V + "blocks.0.attn.qkv.bias": (144,),
    _V + "blocks.0.attn.proj.weight": (48, 48), _V + "blocks.0.attn.proj.bias": (48,),
    _V + "blocks.0.norm2.weight": (48,), _V + "blocks.0.norm2.bias": (48,),
    _V + "blocks.0.mlp.fc1.weight": (192, 48), _V + "blocks.0.mlp.fc1.bias": (192,),
    _V + "blocks.0.mlp.fc2.weight": (48, 192), _V + "blocks.0.mlp.fc2.bias": (48,),
    _V + "norm.weight": (48,), _V + "norm.bias": (48,),
    _T + "embeddings.position_ids": (1, 40),
    _T + "embeddings.word_embeddings.weight": (16, 32), _T + "embeddings.position_embeddings.weight": (40, 32),
    _T + "embeddings.LayerNorm.weight": (32,), _T + "embeddings.LayerNorm.bias": (32,),
    _L + "attention.self.query.weight": (32, 32), _L + "attention.self.query.bias": (32,),
    _L + "attention.self.key.weight": (32, 32), _L + "attention.self.key.bias": (32,),
    _L + "attention.self.value.weight": (32, 32), _L + "attention.self.value.bias": (32,),
    _L + "attention.output.dense.weight": (32, 32), _L + "attention.output.dense.bias": (32,),
    _L + "attention.output.LayerNorm.weight": (32,), _L + "attention.output.LayerNorm.bias": (32,),
    _L + "crossattention.self.query.weight": (32, 32), _L + "crossattention.self.query.bias": (32,),
    _L + "crossattention.self.key.weight": (32, 48), _L + "crossattention.self.key.bias": (32,),
    _L + "crossattention.self.value.weight": (32, 48), _L + "crossattention.self.value.bias": (32,),
    _L + "crossattention.output.dense.weight": (32, 32), _L + "crossattention.output.dense.bias": (32,),
    _L + "crossattention.output.LayerNorm.weight": (32,), _L + "crossattention.output.LayerNorm.bias": (32,),
    _L + "intermediate.dense.weight": (64, 32), _L + "intermediate.dense.bias": (64,),
    _L + "output.dense.weight": (32, 64), _L + "output.dense.bias": (32,),
    _L + "output.LayerNorm.weight": (32,), _L + "output.LayerNorm.bias": (32,),
    "blip.vision_proj.weight": (256, 48), "blip.vision_proj.bias": (256,),
    "blip.text_proj.weight": (256, 32), "blip.text_proj.bias": (256,),
}
MLP_SHAPES = {"mlp.layers.0.weight": (1024, 32), "mlp.layers.0.bias": (1024,),
              "mlp.layers.2.weight": (128, 1024), "mlp.layers.2.bias": (128,),
              "mlp.layers.4.weight": (64, 128), "mlp.layers.4.bias": (64,),
              "mlp.layers.6.weight": (16, 64), "mlp.layers.6.bias": (16,),
              "mlp.layers.7.weight": (1, 16), "mlp.layers.7.bias": (1,)}


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("position_ids"):
            out[k] = torch.arange(shape[1]).expand(shape).clone()
        elif k.endswith("LayerNorm.weight") or k.endswith("norm1.weight") or k.endswith("norm2.weight") \
                or k.endswith("norm.weight"):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.2 * torch.randn(shape, generator=g)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(out)
    return out


def _images(n=4, h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _pixels(images):
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    return torch.stack([tf(Image.fromarray(im)) for im in images])


def _ref_image_embeds(sd, prefix, px):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=2, num_classes=0,
                            global_pool="", qkv_bias=True)
    vit.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    with torch.no_grad():
        return vit.eval().forward_features(px)


def _ref_text(sd, prefix, ids, mask, image_embeds=None):
    """BLIP's med BERT written out: post-LN self-attention, (cross-attention), GELU feed-forward; one layer."""
    p = lambda name: sd[prefix + name]  # noqa: E731
    lin = lambda x, n: x @ p(n + ".weight").T + p(n + ".bias")  # noqa: E731
    ln = lambda x, n: F.layer_norm(x, (32,), p(n + ".weight"), p(n + ".bias"), eps=1e-12)  # noqa: E731

    def attention(x, ctx, n, additive):
        heads = lambda t: t.view(t.shape[0], t.shape[1], 2, 16).transpose(1, 2)  # noqa: E731
        q, k, v = heads(lin(x, n + ".self.query")), heads(lin(ctx, n + ".self.key")), heads(lin(ctx, n + ".self.value"))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(16) + additive
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return ln(lin(o, n + ".output.dense") + x, n + ".output.LayerNorm")

    x = ln(p("embeddings.word_embeddings.weight")[ids] + p("embeddings.position_embeddings.weight")[: ids.shape[1]],
           "embeddings.LayerNorm")
    x = attention(x, x, "encoder.layer.0.attention", (1.0 - mask[:, None, None, :].float()) * -10000.0)
    if image_embeds is not None:
        x = attention(x, image_embeds, "encoder.layer.0.crossattention", 0.0)
    h = F.gelu(lin(x, "encoder.layer.0.intermediate.dense"))
    return ln(lin(h, "encoder.layer.0.output.dense") + x, "encoder.layer.0.output.LayerNorm")


def _tokens(bert_dir, prompts):
    from transformers import BertTokenizer

    t = BertTokenizer.from_pretrained(bert_dir)
    return t(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


def _image_reward(tmp_path, bert_dir, state):
    torch.save(state, tmp_path / "ImageReward.pt")
    return build_metric("image_reward", str(tmp_path / "ImageReward.pt"), med_config=MED, vision=VISION,
                        tokenizer=str(bert_dir))


def test_image_reward_loads_the_original_layout_strictly_and_matches_a_hand_computation(tmp_path, bert_dir):
    state = _random_state({**BLIP_SHAPES, **MLP_SHAPES})
    metric = _image_reward(tmp_path, bert_dir, state)
    assert set(metric.model.state_dict()) == set(BLIP_SHAPES) | set(MLP_SHAPES)
    images = _images()
    got = metric(images, PROMPTS)
    assert got.shape == (4,) and got.dtype == np.float64 and np.isfinite(got).all()

    tok = _tokens(bert_dir, PROMPTS)
    with torch.no_grad():
        img = _ref_image_embeds(state, _V, _pixels(images))
        cls = _ref_text(state, _T, tok["input_ids"], tok["attention_mask"], img)[:, 0]
        h = cls
        for i in (0, 2, 4, 6, 7):
            h = h @ state[f"mlp.layers.{i}.weight"].T + state[f"mlp.layers.{i}.bias"]
        expected = (h.squeeze(-1) - IR_MEAN) / IR_STD
    np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-4, atol=1e-4)
    assert np.ptp(got) > 1e-3  # the image and the prompt matter


def test_image_reward_normalisation_constants_are_applied(tmp_path, bert_dir):
    state = _random_state({**BLIP_SHAPES, **MLP_SHAPES})
    state.update({k: torch.zeros(v) for k, v in MLP_SHAPES.items()})
    got = _image_reward(tmp_path, bert_dir, state)(_images(2), PROMPTS[:2])
    np.testing.assert_allclose(got, [-IR_MEAN / IR_STD] * 2, rtol=1e-6)
    state["mlp.layers.7.bias"] = torch.ones(1)
    got = _image_reward(tmp_path, bert_dir, state)(_images(2), PROMPTS[:2])
    np.testing.assert_allclose(got, [(1 - IR_MEAN) / IR_STD] * 2, rtol=1e-6)


def test_image_reward_rejects_a_checkpoint_with_a_wrong_key(tmp_path, bert_dir):
    state = _random_state({**BLIP_SHAPES, **MLP_SHAPES})
    key = _L + "crossattention.self.key.weight"
    state[key.replace("crossattention", "cross_attention")] = state.pop(key)
    with pytest.raises(RuntimeError, match="crossattention.self.key.weight"):
        _image_reward(tmp_path, bert_dir, state)


def test_blip_score_is_the_itc_cosine_of_the_pretrain_checkpoint(tmp_path, bert_dir):
    blip = {k[len("blip."):]: v for k, v in _random_state(BLIP_SHAPES, seed=1).items()}
    # a pre-train checkpoint also holds the momentum encoders, ITM head, decoder, queues and temperature
    extras = {"visual_encoder_m.cls_token": torch.zeros(1, 1, 48), "text_encoder_m.embeddings.LayerNorm.bias":
              torch.zeros(32), "vision_proj_m.weight": torch.zeros(256, 48), "text_proj_m.bias": torch.zeros(256),
              "itm_head.weight": torch.zeros(2, 32), "text_decoder.cls.predictions.bias": torch.zeros(16),
              "temp": torch.tensor(0.07), "image_queue": torch.zeros(256, 8), "text_queue": torch.zeros(256, 8),
              "queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"model": {**blip, **extras}}, tmp_path / "model_large.pth")
    metric = build_metric("blip_score", str(tmp_path / "model_large.pth"), med_config=MED, vision=VISION,
                          tokenizer=str(bert_dir))
    images = _images(seed=1)
    got = metric(images, PROMPTS)
    assert got.shape == (4,) and np.all(np.abs(got) <= 1 + 1e-6) and np.ptp(got) > 1e-3

    tok = _tokens(bert_dir, PROMPTS)
    with torch.no_grad():
        img = _ref_image_embeds(blip, "visual_encoder.", _pixels(images))[:, 0]
        img = F.normalize(img @ blip["vision_proj.weight"].T + blip["vision_proj.bias"], dim=-1)
        txt = _ref_text(blip, "text_encoder.", tok["input_ids"], tok["attention_mask"])[:, 0]
        txt = F.normalize(txt @ blip["text_proj.weight"].T + blip["text_proj.bias"], dim=-1)
    np.testing.assert_allclose(got, (img * txt).sum(-1).double().numpy(), rtol=1e-4, atol=1e-5)

    torch.save({"model": {**blip, "something_else.weight": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(RuntimeError, match="something_else.weight"):
        build_metric("blip_score", str(tmp_path / "odd.pth"), med_config=MED, vision=VISION, tokenizer=str(bert_dir))
