
import numpy as np
import pytest
import torch

from sd3_adrpo.rewards import REWARDS, Reward, build_reward, register_reward


def _images(n=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))


def test_clip_reward_is_100_cos_from_the_models_own_forward(tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    reward = build_reward("clip", str(tiny_models["clip"]))
    images, prompts = _images(), ["a red circle", "a blue square", "two green triangles", "a cat"]
    got = reward(images, prompts)
    model = CLIPModel.from_pretrained(str(tiny_models["clip"])).eval()
    proc = CLIPProcessor.from_pretrained(str(tiny_models["clip"]))
    with torch.no_grad():
        out = model(**proc(text=prompts, images=list(images.numpy()), return_tensors="pt", padding=True))
    expected = 100 * out.logits_per_image.diag() / model.logit_scale.exp()
    assert got.shape == (4,) and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_open_clip_reward_from_a_local_weights_file(tmp_path, tiny_open_clip):
    import open_clip

    name, model = tiny_open_clip
    torch.save(model.state_dict(), tmp_path / "weights.pt")

    reward = build_reward("open_clip", name, pretrained=str(tmp_path / "weights.pt"))
    images, prompts = _images(3), ["a red circle", "a blue square", "a cat"]
    got = reward(images, prompts)
    _, _, preprocess = open_clip.create_model_and_transforms(name)
    from PIL import Image

    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images.numpy()])
    with torch.no_grad():
        img, txt, _ = model(pixels, open_clip.get_tokenizer(name)(prompts))
    assert torch.allclose(got, 100 * (img * txt).sum(-1), atol=1e-4)


def test_registry_and_input_checks(tiny_models):
    assert {"clip", "open_clip"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward 'nope'; available: clip"):
        build_reward("nope", "x")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("clip")(Reward)
    reward = build_reward("clip", str(tiny_models["clip"]))
    with pytest.raises(ValueError, match="uint8 images"):
        reward(torch.rand(2, 64, 64, 3), ["a", "b"])
