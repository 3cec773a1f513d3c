"""ClipScore, PickScore, the aesthetic predictor and HPSv2 against independent computations on tiny models."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sd3_adrpo.metrics import build_metric

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a cat"]
AESTHETIC_HEAD = Path(__file__).resolve().parents[2] / ".." / "shared" / "weights" / "laion-aesthetic-v2" / \
    "sac+logos+ava1-l14-linearMSE.pth"


def _images(n=4, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip768(tiny_models, tmp_path_factory):
    """The tiny CLIP with a 768-d projection, the size the aesthetic head takes."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    out = tmp_path_factory.mktemp("clip768")
    cfg = CLIPConfig.from_pretrained(tiny_models["clip"])
    cfg.projection_dim = 768
    torch.manual_seed(1)
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor.from_pretrained(tiny_models["clip"]).save_pretrained(out)
    return out


def test_clip_score_equals_torchmetrics(tiny_models):
    tm = pytest.importorskip("torchmetrics.multimodal.clip_score", reason="torchmetrics is the oracle here")
    from transformers import CLIPModel, CLIPProcessor

    class TensorFeatures(torch.nn.Module):  # transformers 5 returns output objects; torchmetrics wants tensors
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    path = str(tiny_models["clip"])
    def load():
        return TensorFeatures(CLIPModel.from_pretrained(path).eval()), CLIPProcessor.from_pretrained(path)

    images = _images(6)
    prompts = PROMPTS + ["a red square", "three blue circles"]
    got = build_metric("clip_score", path, batch_size=4)(images, prompts)  # 2 batches
    oracle = tm.CLIPScore(model_name_or_path=load)
    expected = []
    for im, p in zip(images, prompts):  # torchmetrics clamps the mean; one pair at a time clamps each pair
        oracle.reset()
        oracle.update(torch.from_numpy(im).permute(2, 0, 1), p)
        expected.append(float(oracle.compute()))
    assert got.dtype == np.float64 and got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got >= 0).all()


def test_clip_score_embeddings_feed_diversity(tiny_models):
    from sd3_adrpo.evaluation import clip_diversity

    metric = build_metric("clip_score", str(tiny_models["clip"]), batch_size=3)
    emb = metric.embed_images(torch.from_numpy(_images(4)))
    assert emb.shape == (4, 32)
    div = clip_diversity(emb, torch.tensor([0, 0, 1, 1]))
    assert div["cosine"].shape == (2,) and (div["cosine"] > 0).all()


def test_pickscore_is_exp_logit_scale_times_cosine(tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    path = str(tiny_models["clip"])
    got = build_metric("pickscore", path, batch_size=3)(torch.from_numpy(_images()), PROMPTS)
    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model(**proc(text=PROMPTS, images=list(_images()), return_tensors="pt", padding=True))
    np.testing.assert_allclose(got, out.logits_per_image.diag().double().numpy(), rtol=1e-4, atol=1e-4)
    assert model.logit_scale.exp() > 1 and np.abs(got).max() > 1  # raw: not divided back to a cosine


def _collapsed_affine(state):
    """The five linear maps (no activations between them) as one (768,) weight and scalar bias."""
    w, b = torch.eye(768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64)
    for i in (0, 2, 4, 6, 7):
        wi, bi = state[f"layers.{i}.weight"].double(), state[f"layers.{i}.bias"].double()
        w, b = wi @ w, wi @ b + bi
    return w[0], b[0]


@pytest.mark.skipif(not AESTHETIC_HEAD.is_file(), reason=f"real aesthetic head not at {AESTHETIC_HEAD} (the shared "
                                                          "weights folder ships beside the project only)")
def test_aesthetic_equals_the_collapsed_affine_head_on_unit_embeddings(clip768):
    state = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    w, b = _collapsed_affine(state)
    metric = build_metric("aesthetic", str(AESTHETIC_HEAD), clip=str(clip768))
    emb = torch.randn(16, 768, generator=torch.Generator().manual_seed(0))
    unit = emb / emb.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(metric.score_embeddings(3.7 * emb).double().numpy(), (unit.double() @ w + b).numpy(),
                               rtol=1e-4, atol=1e-4)  # scale-free: the embedding is L2-normalised first

    got = metric(_images(3), PROMPTS[:3])
    assert got.shape == (3,) and np.isfinite(got).all()
    img = build_metric("clip_score", str(clip768)).embed_images(_images(3)).double()
    np.testing.assert_allclose(got, (img / img.norm(dim=-1, keepdim=True) @ w + b).numpy(), rtol=1e-4, atol=1e-4)


def test_aesthetic_wants_a_768_d_clip(tiny_models, tmp_path):
    from sd3_adrpo.metrics.base import LinearHead

    torch.save(LinearHead(768).state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="768-d CLIP ViT-L/14 image embeddings .* gives 32-d"):
        build_metric("aesthetic", str(tmp_path / "head.pth"), clip=str(tiny_models["clip"]))


def test_hpsv2_is_the_cosine_of_the_open_clip_features_with_the_checkpoint_loaded(tmp_path, tiny_open_clip):
    import open_clip
    from PIL import Image

    name, model = tiny_open_clip
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_tiny.pt")  # the HPS checkpoint format

    images = _images(3, h=48, w=80)  # not square: HPSv2 resizes the longest edge and pads
    got = build_metric("hpsv2", str(tmp_path / "HPS_tiny.pt"), arch=name, batch_size=2)(images, PROMPTS[:3])
    preprocess = open_clip.image_transform(64, is_train=False, resize_mode="longest", fill_color=0)
    px = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        out = model(px, open_clip.get_tokenizer(name)(PROMPTS[:3]))
    img, txt = out[0], out[1]
    np.testing.assert_allclose(got, (img @ txt.T).diag().double().numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() <= 1 + 1e-6
