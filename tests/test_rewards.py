"""The one scorer registry as training rewards: the CLIP score, parsing `reward:`, weighted sums, plug-ins, metadata."""

import numpy as np
import pytest
import torch

from sd3_adrpo.metrics import METRICS, Metric, build_metric, call_scorer, metric_class
from sd3_adrpo.reward_spec import RewardTerm, parse_reward
from sd3_adrpo.rewards import REWARDS, Reward, WeightedReward, build_reward, probe_reward, register_reward


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
        expected = (100 * out.logits_per_image.diag() / model.logit_scale.exp()).double().numpy()
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the evaluation's ClipScore is the same implementation, clamped at 0
    clamped = build_metric("clip_score", str(tiny_models["clip"]))(images, prompts)
    np.testing.assert_allclose(clamped, np.maximum(expected, 0), rtol=1e-4, atol=1e-4)
    assert type(reward.scorers[0]).__mro__[1] is type(build_metric("clip_score", str(tiny_models["clip"])))


def test_open_clip_reward_from_a_local_weights_file(tmp_path, tiny_open_clip):
    import open_clip
    from PIL import Image

    name, model = tiny_open_clip
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    reward = build_reward("open_clip", name, pretrained=str(tmp_path / "weights.pt"))
    images, prompts = _images(3), ["a red circle", "a blue square", "a cat"]
    got = reward(images, prompts)
    _, _, preprocess = open_clip.create_model_and_transforms(name)
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images.numpy()])
    with torch.no_grad():
        img, txt, _ = model(pixels, open_clip.get_tokenizer(name)(prompts))
    np.testing.assert_allclose(got, (100 * (img * txt).sum(-1)).double().numpy(), atol=1e-4)


def test_one_registry_for_rewards_and_metrics(tiny_models):
    assert REWARDS is METRICS and Reward is Metric and register_reward.__name__ == "register_metric"
    assert {"clip", "open_clip", "clip_score", "pickscore", "aesthetic", "hpsv2", "image_reward",
            "blip_score"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward 'nope'; available: .*clip.*pickscore"):
        build_reward("nope", "x")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("clip")(Reward)
    # a reward is a judge: the evaluation builds the very same class by the same name
    assert metric_class("clip") is type(build_reward("clip", str(tiny_models["clip"])).scorers[0])
    with pytest.raises(ValueError, match="uint8 images"):
        build_reward("clip", str(tiny_models["clip"]))(torch.rand(2, 64, 64, 3), ["a", "b"])


def test_parse_reward_forms():
    assert parse_reward("clip", "CLIP") == [RewardTerm("clip", 1.0, "CLIP", model_from="reward_model")]
    terms = parse_reward("clip=1,aesthetic@head.pth=0.5,pickscore@pick", "CLIP")
    assert [(t.spec, t.weight, t.model) for t in terms] == [("clip", 1.0, "CLIP"), ("aesthetic", 0.5, "head.pth"),
                                                             ("pickscore", 1.0, "pick")]
    assert terms[1].options == {"clip": "CLIP"}  # the aesthetic head reads the reward's CLIP unless told otherwise
    yaml_form = parse_reward({"clip": 2, "aesthetic": {"weight": 0.5, "model": "h.pth", "clip": "other"},
                              "my_file.py:Mine": {"key": "mine", "scale": 3}}, None)
    assert [(t.spec, t.weight, t.model, t.options, t.key) for t in yaml_form] == [
        ("clip", 2.0, None, {}, None), ("aesthetic", 0.5, "h.pth", {"clip": "other"}, None),
        ("my_file.py:Mine", 1.0, None, {"scale": 3}, "mine")]
    assert parse_reward("http://127.0.0.1:8765=0.5,open_clip", "ViT-B-32", "openai") == [
        RewardTerm("http://127.0.0.1:8765", 0.5), RewardTerm("open_clip", 1.0, "ViT-B-32", {"pretrained": "openai"},
                                                             model_from="reward_model")]
    # the reward's CLIP (reward_model) is the weights of a CLIP score only: PickScore keeps its own default
    from sd3_adrpo.rewards import check_reward

    assert check_reward("pickscore", "CLIP")[0].model is None and check_reward("clip", "CLIP")[0].model == "CLIP"
    for bad, says in [("clip=lots", "the weight after '=' must be a finite number"), ("clip=0", "every weight is 0"),
                      ("clip,clip", "names a scorer twice"), (5, "must be a scorer name"), ("", "names no scorer"),
                      ({"clip": "high"}, "the weight must be a finite number")]:
        with pytest.raises(ValueError, match=says):
            parse_reward(bad)


class _Fixed(Metric):
    """Returns given scores, whatever the images (to test how scorers combine)."""

    def __init__(self, weights=None, device="cpu", scores=()):
        self.scores = np.asarray(scores, float)

    def __call__(self, images, prompts):
        return self.scores[: len(prompts)]


def test_weighted_advantages_equal_a_direct_computation():
    from sd3_adrpo.config import TrainConfig
    from sd3_adrpo.trainer import advantage_stats, scorer_stats

    rng = np.random.default_rng(0)
    r_clip, r_aes = rng.normal(25, 10, 12), rng.normal(5, 0.3, 12)
    groups = torch.arange(3).repeat_interleave(4)
    reward = WeightedReward([RewardTerm("clip", 1.0), RewardTerm("aesthetic", 0.5)],
                            [_Fixed(scores=r_clip), _Fixed(scores=r_aes)])
    parts = reward.components(np.zeros((12, 8, 8, 3), np.uint8), ["p"] * 12)
    combined = torch.from_numpy(reward.combine(parts)).float()
    valid = torch.ones(12, dtype=torch.bool)
    cfg = TrainConfig(adv_scale="group_std", adv_clip=False)
    adv, _ = advantage_stats(combined, groups, valid, cfg)
    direct = []
    for g in range(3):
        s = 1.0 * r_clip[4 * g : 4 * g + 4] + 0.5 * r_aes[4 * g : 4 * g + 4]
        direct.extend((s - s.mean()) / s.std())  # the group std (population), as adv_scale group_std divides
    np.testing.assert_allclose(adv.numpy(), direct, rtol=1e-3, atol=1e-3)
    stats = scorer_stats(torch.from_numpy(np.stack([r_clip, r_aes], 1)).float(), reward.keys, groups, valid)
    assert stats["reward_clip_mean"] == pytest.approx(r_clip.mean(), rel=1e-5)
    assert stats["reward_aesthetic_group_std"] == pytest.approx(np.mean([r_aes[4 * g : 4 * g + 4].std()
                                                                         for g in range(3)]), rel=1e-4)
    # a non-finite score of any scorer makes that sample's reward NaN (dropped), never a partial sum
    r_aes[1] = np.nan
    assert np.isnan(reward.combine(reward.components(np.zeros((12, 8, 8, 3), np.uint8), ["p"] * 12))[1])


def test_metadata_reaches_only_scorers_that_take_it():
    seen = {}

    class WithMeta(Metric):
        def __call__(self, images, prompts, metadata):
            seen["metadata"] = metadata
            return np.array([float(m.get("target", 0)) for m in metadata])

    images = np.zeros((2, 8, 8, 3), np.uint8)
    got = call_scorer(WithMeta(), images, ["a", "b"], [{"target": 3}, {}])
    assert got.tolist() == [3.0, 0.0] and seen["metadata"] == [{"target": 3}, {}]
    assert call_scorer(WithMeta(), images, ["a", "b"]).tolist() == [0.0, 0.0]  # no file metadata: empty dicts
    assert call_scorer(_Fixed(scores=[1, 2]), images, ["a", "b"], [{"x": 1}, {}]).tolist() == [1.0, 2.0]


PLUGIN = '''
import numpy as np
from sd3_adrpo.metrics import Metric


class Brightness(Metric):
    """Mean pixel value / 255, times `scale`."""

    def __init__(self, weights=None, device="cpu", scale=1.0):
        self.scale = scale

    def __call__(self, images, prompts):
        return self.scale * np.asarray(images, float).mean(axis=(1, 2, 3)) / 255


class OneShort(Brightness):
    def __call__(self, images, prompts):
        return super().__call__(images, prompts)[:-1]


class NotAScorer:
    pass
'''


def test_a_plugin_file_loads_and_bad_ones_say_what_to_fix(tmp_path):
    path = tmp_path / "my_scorer.py"
    path.write_text(PLUGIN)
    reward = build_reward({f"{path}:Brightness": {"scale": 2.0}})
    images = np.full((2, 8, 8, 3), 255, np.uint8)
    assert reward(images, ["a", "b"]).tolist() == [2.0, 2.0] and reward.keys == ["Brightness"]
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for 2 images at the start-up check"):
        probe_reward(build_reward(f"{path}:OneShort"), ["a red circle"])
    with pytest.raises(ValueError, match="NotAScorer' in .*my_scorer.py' is not a subclass of sd3_adrpo.metrics.Metric"):
        build_reward(f"{path}:NotAScorer")
    with pytest.raises(ValueError, match="my_scorer.py' defines no 'Nope'"):
        build_reward(f"{path}:Nope")
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['scal'\\]; Brightness accepts scale"):
        build_reward({f"{path}:Brightness": {"scal": 2.0}})
    broken = tmp_path / "broken.py"
    broken.write_text("import numpy as np\n\nimport not_installed_anywhere\n")
    with pytest.raises(ValueError, match="importing '.*broken.py' failed \\(line 3\\): ModuleNotFoundError"):
        build_reward(f"{broken}:Scorer")
    with pytest.raises(ValueError, match="no such file '.*missing.py'"):
        build_reward(f"{tmp_path / 'missing.py'}:Scorer")
    with pytest.raises(ValueError, match="aesthetic needs its weights"):
        build_reward("aesthetic")


def test_every_reward_form_is_a_judge_too(tiny_models, tmp_path):
    from sd3_adrpo.evaluation import build_judges, judge_images
    from sd3_adrpo.metrics.base import LinearHead

    path = tmp_path / "my_scorer.py"
    path.write_text(PLUGIN)
    clip = str(tiny_models["clip"])
    torch.save(LinearHead(32).state_dict(), tmp_path / "head32.pth")  # a stand-in head for the 32-d tiny CLIP
    judges = build_judges([f"clip@{clip}", f"pickscore@{clip}", "tinyworld.scorers:Oracle", f"{path}:Brightness",
                           f"{{aesthetic: {{model: {tmp_path / 'head32.pth'}, clip: {clip}}}}}"])
    assert list(judges) == ["clip", "pickscore", "oracle_accuracy", "Brightness", "aesthetic"]
    images = np.full((2, 64, 64, 3), 255, np.uint8)
    scores, categories = judge_images(judges, images, ["a red circle", "two blue squares"])
    assert all(v.shape == (2,) and np.isfinite(v).all() for v in scores.values())
    assert categories == ["colour", "counting"]
    np.testing.assert_allclose(scores["clip"], build_reward("clip", clip)(images, ["a red circle", "two blue squares"]))
