import json
import math

import numpy as np
import pytest
import torch

import train_sd3_adrpo
from sd3_adrpo.evaluation import (clip_diversity, clip_scores, evaluate_policy, merge_shards, oracle_for,
                                  paired_bootstrap, shard_bounds)


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


def test_oracle_only_for_tiny_world_prompts():
    assert oracle_for(["a red circle", "two blue squares"]) is not None
    assert oracle_for(["a red circle", "an astronaut riding a horse"]) is None


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
    whole = evaluate_policy(sampler, clip, prompts, 3, 64, seed=7)
    shards = [evaluate_policy(sampler, clip, prompts, 3, 64, seed=7, shard=(r, 4)) for r in range(4)]
    assert [len(s.prompts) for s in shards] == [0, 3, 3, 3]
    merged = merge_shards(shards)
    assert merged.prompts == whole.prompts and merged.category == whole.category
    assert np.abs(merged.images.astype(int) - whole.images.astype(int)).max() <= 1  # same noise, same images
    assert np.allclose(merged.clip_score, whole.clip_score, atol=1e-3)
    assert np.array_equal(merged.oracle_ok, whole.oracle_ok)
    for name in whole.diversity:
        assert np.allclose(merged.diversity[name], whole.diversity[name], atol=1e-3)
    other_seed = merge_shards([evaluate_policy(sampler, clip, prompts, 3, 64, seed=8, shard=(r, 2)) for r in range(2)])
    assert np.abs(other_seed.images.astype(int) - whole.images.astype(int)).max() > 10  # the check can fail
    with pytest.raises(ValueError, match="with_w2"):
        evaluate_policy(sampler, clip, prompts, 3, 64, seed=7, with_w2=True, shard=(0, 2))


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
            "--num_inference_steps", "3", "--checkpoint_every", "0", "--learning_rate", lr, "--output_dir", str(out)]
    assert train_sd3_adrpo.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["meta"]["num_prompts"] == 4 and summary["meta"]["images_per_prompt"] == 3
    for key in ("clip_score", "clip_diversity_cosine", "clip_diversity_l2", "oracle_accuracy",
                "oracle_accuracy_colour", "oracle_accuracy_counting", "oracle_accuracy_position",
                "oracle_accuracy_binding"):
        assert metrics[key]["ci_low"] <= metrics[key]["diff"] <= metrics[key]["ci_high"], key
    rows = [json.loads(line) for line in (out / "eval_images.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[3]["prompt"] == "two blue squares"
    md = (out / "summary.md").read_text()
    assert "clip_score" in md and f"# Evaluation on {prompts}: base vs trained" in md  # says which prompts it judged
    if lr == "0":  # an unchanged policy: the same seeds give the same images, so every difference is exactly 0
        assert all(r["clip_score_base"] == r["clip_score_trained"] for r in rows)
        assert all(m["diff"] == 0 for m in metrics.values() if isinstance(m, dict))
    else:
        assert any(r["clip_score_base"] != r["clip_score_trained"] for r in rows)
