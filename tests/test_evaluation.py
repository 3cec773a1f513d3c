import json
import math

import numpy as np
import pytest
import torch

import train_sd3_adrpo
from sd3_adrpo.evaluation import (build_judges, clip_diversity, clip_scores, evaluate_policy, judge_images,
                                  merge_shards, paired_bootstrap, shard_bounds)
from sd3_adrpo.metrics import Metric


def test_clip_diversity_on_known_distances():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    groups = torch.tensor([0, 0, 0, 1, 1])
    d = clip_diversity(e, groups)
    # group 0: cosines 0, -1, 0 -> 100*(1-cos) = 100, 200, 100; L2 = sqrt2, 2, sqrt2.  group 1: identical images.
    assert np.allclose(d["cosine"], [400 / 3, 0.0])
    assert np.allclose(d["l2"], [(2 * math.sqrt(2) + 2) / 3, 0.0])
    scaled = clip_diversity(3 * e, groups)
    assert np.allclose(scaled["cosine"], d["cosine"]) and np.allclose(scaled["l2"], 3 * d["l2"])
    with pytest.raises(ValueError, match="at least 2 images"):
        clip_diversity(e[:1], groups[:1])


def test_clip_score_is_clamped_at_zero():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(clip_scores(img, txt), torch.tensor([100.0, 0.0, 60.0]))


def test_paired_bootstrap():
    before = np.array([1.0, 2.0, 3.0, 4.0])
    same_shift = paired_bootstrap(before, before + 0.5)
    assert same_shift["diff"] == pytest.approx(0.5)
    assert same_shift["ci_low"] == pytest.approx(0.5) and same_shift["ci_high"] == pytest.approx(0.5)
    noisy = paired_bootstrap(before, before + np.array([-1.0, 1.0, -1.0, 1.0]), n_boot=4000)
    assert noisy["diff"] == pytest.approx(0.0) and noisy["ci_low"] < 0 < noisy["ci_high"]
    assert noisy["n_clusters"] == 4 and noisy["before"] == pytest.approx(2.5)


class _Brightness(Metric):
    """A judge written outside the package's registry: mean pixel value, prompts sorted by their first word."""

    key, label = "brightness", "Brightness"

    def __init__(self, weights=None, device="cpu"):
        pass

    def __call__(self, images, prompts):
        return np.asarray(images, float).mean(axis=(1, 2, 3))

    def categories(self, prompts):
        return [p.split()[0] for p in prompts]


def test_judges_by_import_path_score_each_image_and_sort_prompts_into_categories(monkeypatch):
    import sys
    import types

    module = types.ModuleType("my_judges")
    module.Brightness = _Brightness
    monkeypatch.setitem(sys.modules, "my_judges", module)
    judges = build_judges(["my_judges:Brightness"])
    assert list(judges) == ["brightness"]
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 100, 200)])
    scores, category = judge_images(judges, images, ["red a", "red b", "blue c"])
    assert np.allclose(scores["brightness"], [0, 100, 200]) and category == ["red", "red", "blue"]
    with pytest.raises(ValueError, match="two judges report the column 'brightness'"):
        build_judges(["my_judges:Brightness", "my_judges:Brightness"])
    with pytest.raises(ValueError, match="cannot import 'Nope' from module 'my_judges'"):
        build_judges(["my_judges:Nope"])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        build_judges(["nope"])


def test_shard_bounds_cover_every_item_once():
    for n, world in [(10, 3), (2, 4), (405, 2), (0, 2)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_sharded_evaluation_merges_to_the_whole(tiny_pipe, tiny_models):
    """Each process evaluates its share of the prompts with the noise those prompts get in the whole evaluation,
    so the merged shards are the unsharded evaluation (one shard here is empty: more processes than prompts)."""
    from sd3_adrpo.rewards import ClipScoreReward
    from sd3_adrpo.rollout import SD3Sampler

    sampler = SD3Sampler(tiny_pipe, torch.device("cpu"), num_inference_steps=3, guidance_scale=3.0,
                         max_sequence_length=4, batch_size=64)
    clip = ClipScoreReward(str(tiny_models["clip"]), device="cpu")
    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
    judges = build_judges(["tinyworld.scorers:Oracle"])
    whole = evaluate_policy(sampler, clip, prompts, 3, 64, seed=7, judges=judges)
    shards = [evaluate_policy(sampler, clip, prompts, 3, 64, seed=7, shard=(r, 4), judges=judges) for r in range(4)]
    assert [len(s.prompts) for s in shards] == [0, 3, 3, 3]
    merged = merge_shards(shards)
    assert merged.prompts == whole.prompts and merged.category == whole.category
    assert whole.category == ["colour"] * 3 + ["counting"] * 3 + ["position"] * 3
    assert np.abs(merged.images.astype(int) - whole.images.astype(int)).max() <= 1  # same noise, same images
    assert np.allclose(merged.clip_score, whole.clip_score, atol=1e-3)
    assert np.array_equal(merged.judged["oracle_accuracy"], whole.judged["oracle_accuracy"])
    for name in whole.diversity:
        assert np.allclose(merged.diversity[name], whole.diversity[name], atol=1e-3)
    other_seed = merge_shards([evaluate_policy(sampler, clip, prompts, 3, 64, seed=8, shard=(r, 2)) for r in range(2)])
    assert np.abs(other_seed.images.astype(int) - whole.images.astype(int)).max() > 10  # the check can fail
    # W2 on shards: each sample gets the (sigma, noise) draw it has in the whole evaluation
    from sd3_adrpo.models import add_lora

    with torch.no_grad():
        for p in add_lora(tiny_pipe.transformer, rank=2):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    whole = evaluate_policy(sampler, clip, prompts, 3, 64, seed=7, with_w2=True)
    merged = merge_shards([evaluate_policy(sampler, clip, prompts, 3, 64, seed=7, with_w2=True, shard=(r, 2))
                           for r in range(2)])
    assert set(whole.w2) == {"w2_divergence", "w2_divergence_conditional", "w2_divergence_unconditional"}
    for key in whole.w2:
        assert np.allclose(merged.w2[key], whole.w2[key], rtol=1e-3) and np.all(whole.w2[key] > 0), key


@pytest.mark.parametrize("lr", ["0", "5e-2"])
def test_final_evaluation_is_paired_and_written(tiny_models, tmp_path, lr):
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a yellow circle\n"
                       "a purple square and an orange circle\n")
    out = tmp_path / "run"
    args = ["--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", "null",
            "--final_eval_prompts", str(prompts), "--final_eval_images_per_prompt", "3", "--num_iterations", "2",
            "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "2",
            "--num_inference_steps", "3", "--checkpoint_every", "0", "--learning_rate", lr, "--output_dir", str(out),
            "--judges", "tinyworld.scorers:Oracle"]
    assert train_sd3_adrpo.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["meta"]["num_prompts"] == 4 and summary["meta"]["images_per_prompt"] == 3
    for key in ("clip_score", "clip_diversity_cosine", "clip_diversity_l2", "oracle_accuracy",
                "oracle_accuracy_colour", "oracle_accuracy_counting", "oracle_accuracy_position",
                "oracle_accuracy_binding", "w2_divergence", "w2_divergence_conditional", "w2_divergence_unconditional"):
        assert metrics[key]["ci_low"] <= metrics[key]["diff"] <= metrics[key]["ci_high"], key
    rows = [json.loads(line) for line in (out / "eval_images.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[3]["prompt"] == "two blue squares" and rows[3]["category"] == "counting"
    assert {"oracle_accuracy_base", "oracle_accuracy_trained"} <= set(rows[0])
    md = (out / "summary.md").read_text()
    assert "clip_score" in md and f"# Evaluation on {prompts}: base vs trained" in md  # says which prompts it judged
    # the summary's W2 is the trained policy's on its own samples (the base is the reference: 0), per image too
    assert metrics["w2_divergence"]["before"] == 0
    assert metrics["w2_divergence"]["after"] == pytest.approx(np.mean([r["w2_divergence"] for r in rows]))
    if lr == "0":  # an unchanged policy: the same seeds give the same images, so every difference is exactly 0
        assert all(r["clip_score_base"] == r["clip_score_trained"] for r in rows)
        assert all(m["diff"] == 0 for m in metrics.values() if isinstance(m, dict))
    else:
        assert any(r["clip_score_base"] != r["clip_score_trained"] for r in rows)


def test_evaluation_in_chunks_holds_a_bounded_batch_and_equals_one_call(tiny_pipe, tiny_models, monkeypatch):
    """However many prompts, each sampler call holds at most one chunk (the latents and embeddings of one batch), and
    the chunked result is the one-call result."""
    from sd3_adrpo.rewards import ClipScoreReward
    from sd3_adrpo.rollout import SD3Sampler

    from sd3_adrpo.models import add_lora

    with torch.no_grad():
        for p in add_lora(tiny_pipe.transformer, rank=2):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.3)
    sampler = SD3Sampler(tiny_pipe, torch.device("cpu"), num_inference_steps=2, guidance_scale=3.0,
                         max_sequence_length=4, batch_size=6)
    clip = ClipScoreReward(str(tiny_models["clip"]), device="cpu")
    prompts = ["a red circle", "two blue squares", "a green triangle", "a yellow square", "three red circles"]
    judges = build_judges(["tinyworld.scorers:Oracle"])
    calls = []
    original = SD3Sampler.sample

    def recording(self, ps, *args, **kwargs):
        calls.append(len(ps))
        return original(self, ps, *args, **kwargs)

    monkeypatch.setattr(SD3Sampler, "sample", recording)
    chunked = evaluate_policy(sampler, clip, prompts, 3, 64, seed=1, judges=judges, with_w2=True)
    assert calls == [2, 2, 1]  # batch 6 / 3 images = 2 prompts a call
    calls.clear()
    whole = evaluate_policy(sampler, clip, prompts, 3, 64, seed=1, judges=judges, with_w2=True, chunk_prompts=5)
    assert calls == [5]
    assert chunked.prompts == whole.prompts and chunked.category == whole.category
    assert np.abs(chunked.images.astype(int) - whole.images.astype(int)).max() <= 1
    assert np.allclose(chunked.clip_score, whole.clip_score, atol=1e-3)
    for name in whole.diversity:
        assert np.allclose(chunked.diversity[name], whole.diversity[name], atol=1e-3)
    for name in whole.w2:
        assert np.allclose(chunked.w2[name], whole.w2[name], rtol=1e-3, atol=1e-12)
