"""The monitor's image statistics on constructed images, the alarm grammar and logic, and keep-best's choice."""

import numpy as np
import pytest

from sd3_adrpo.monitor import (Alarm, Monitor, brightness, colour_entropy, edge_density, image_statistics,
                               parse_alarm, saturation, with_changes)


def _scene(background=(40, 90, 160), noise=True, seed=0):
    """A 64 px picture: a textured background with a red square and a yellow disc on it."""
    rng = np.random.default_rng(seed)
    img = np.empty((64, 64, 3), np.uint8)
    img[:] = background
    if noise:
        img = np.clip(img + rng.integers(-60, 60, img.shape), 0, 255).astype(np.uint8)
    img[10:30, 10:30] = (220, 30, 30)
    yy, xx = np.mgrid[:64, :64]
    img[(yy - 44) ** 2 + (xx - 44) ** 2 < 100] = (230, 220, 40)
    return img


def test_colour_entropy_is_the_histogram_entropy_in_bits():
    flat = np.full((1, 8, 8, 3), 128, np.uint8)
    halves = flat.copy()
    halves[0, :, :4] = 0  # two colours, half the pixels each: exactly 1 bit
    quarters = halves.copy()
    quarters[0, :4, 4:] = 255
    quarters[0, :4, :4] = (255, 0, 0)  # four colours, a quarter each: 2 bits
    assert colour_entropy(flat)[0] == 0.0
    assert colour_entropy(halves)[0] == pytest.approx(1.0)
    assert colour_entropy(quarters)[0] == pytest.approx(2.0)


def test_a_wiped_background_lowers_colour_entropy_and_edge_density():
    scene = _scene()[None]
    wiped = _scene(background=(255, 255, 255), noise=False)[None]  # the same objects on a blank background
    assert colour_entropy(wiped)[0] < colour_entropy(scene)[0] - 1.0
    assert edge_density(wiped)[0] < 0.5 * edge_density(scene)[0]
    assert edge_density(np.full((1, 16, 16, 3), 77, np.uint8))[0] == 0.0  # a flat image has no edges
    board = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((4, 4)))  # 4 px black/white squares
    board = np.repeat(board[None, :, :, None], 3, -1).astype(np.uint8)
    # the interior pixels next to a square boundary (2 of every 4 per axis) are edges: 1 - (1/2)^2 of them
    assert edge_density(board)[0] == pytest.approx(0.75, abs=0.05)


def test_brightness_and_saturation():
    black, white = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 255, np.uint8)
    red, grey = np.zeros((1, 4, 4, 3), np.uint8), np.full((1, 4, 4, 3), 100, np.uint8)
    red[..., 0] = 255
    assert brightness(black)[0] == 0.0 and brightness(white)[0] == pytest.approx(1.0)
    assert brightness(red)[0] == pytest.approx(0.299)
    scene = _scene()[None]
    brighter = np.clip(scene.astype(int) + 60, 0, 255).astype(np.uint8)
    assert brightness(brighter)[0] > brightness(scene)[0] + 0.15
    assert saturation(grey)[0] == 0.0 and saturation(black)[0] == 0.0 and saturation(red)[0] == pytest.approx(1.0)
    washed = (0.5 * scene + 0.5 * 200).astype(np.uint8)  # mixed with grey: less saturated
    assert saturation(washed)[0] < saturation(scene)[0]


def test_image_statistics_averages_over_images_and_checks_its_input():
    images = np.stack([_scene(seed=0), _scene(background=(255, 255, 255), noise=False)])
    stats = image_statistics(images)
    assert set(stats) == {"colour_entropy", "brightness", "saturation", "edge_density"}
    assert stats["colour_entropy"] == pytest.approx(colour_entropy(images).mean())
    with pytest.raises(ValueError, match="uint8"):
        image_statistics(images.astype(np.float32))


def test_changes_from_the_base():
    point = with_changes({"iteration": 40, "clip_diversity": 24.0, "w2_divergence": 0.01},
                         {"iteration": 0, "clip_diversity": 30.0, "w2_divergence": 0.0})
    assert point["clip_diversity_change"] == pytest.approx(-6.0)
    assert point["clip_diversity_rel_change"] == pytest.approx(-0.2)
    assert point["w2_divergence_change"] == 0.01 and "w2_divergence_rel_change" not in point  # base 0: no ratio
    assert "iteration_change" not in point


def test_alarm_grammar():
    assert parse_alarm("clip_diversity_rel_change < -0.15 stop") == Alarm("clip_diversity_rel_change", "<", -0.15,
                                                                           "stop")
    assert parse_alarm("w2_divergence>5e-2") == Alarm("w2_divergence", ">", 0.05, "warn")
    for bad, what in (("clip_diversity <", "is not"), ("w2 >= 1", "is not"), ("w2 > 1 explode", "action")):
        with pytest.raises(ValueError, match=what):
            parse_alarm(bad)


def test_alarms_fire_on_their_side_of_the_threshold_only():
    low, high = parse_alarm("oracle_accuracy_change < -0.02 stop"), parse_alarm("w2_divergence > 0.05")
    assert low.fired({"oracle_accuracy_change": -0.03}) and not low.fired({"oracle_accuracy_change": -0.02})
    assert high.fired({"w2_divergence": 0.06}) and not high.fired({"w2_divergence": 0.05})
    assert not low.fired({}) and not high.fired({"w2_divergence": float("nan")})  # no value: no alarm


def test_monitor_reports_firings_against_the_first_point_and_keeps_the_best():
    monitor = Monitor([parse_alarm("oracle_accuracy_change < -0.02 stop"),
                       parse_alarm("clip_diversity_rel_change < -0.15 warn")], keep_best="oracle_accuracy")
    trajectory = [(0, 0.20, 30.0), (20, 0.25, 29.0), (40, 0.30, 27.0), (60, 0.22, 24.0), (80, 0.17, 23.0)]
    seen = [monitor.observe(it, {"oracle_accuracy": acc, "clip_diversity": div}) for it, acc, div in trajectory]
    fired = [[f.alarm.signal for f in firings] for _, firings, _ in seen]
    assert fired == [[], [], [], ["clip_diversity_rel_change"], ["oracle_accuracy_change", "clip_diversity_rel_change"]]
    assert [improved for *_, improved in seen] == [False, True, True, False, False]  # the base is never best/
    assert monitor.best == (40, 0.30)
    stop = seen[-1][1][0]
    assert stop.alarm.action == "stop" and "oracle_accuracy_change = -0.03" in stop.message and "-0.02" in stop.message
    # a resumed run picks the base and the best up again
    resumed = Monitor(monitor.alarms, keep_best="oracle_accuracy")
    resumed.resume([{"iteration": it, **point} for it, (point, *_) in zip((0, 20, 40, 60, 80), seen)])
    point, firings, improved = resumed.observe(100, {"oracle_accuracy": 0.31, "clip_diversity": 30.0})
    assert point["oracle_accuracy_change"] == pytest.approx(0.11) and not firings and improved


def test_a_stop_alarm_checkpoints_exits_3_and_keeps_the_best_policy(tiny_run_args, tmp_path, capsys):
    """A threshold set to trip at the first periodic evaluation after the base: the run stops there with a
    checkpoint, exit code 3 and a message naming the signal, its value and its threshold; best/ holds the policy of
    that evaluation (a diffusers LoRA with its card); the monitor's signals, with their changes from the base, are in
    eval_metrics.jsonl and monitor.png. Resumed with the alarm removed (allowed), the run finishes."""
    import json

    from safetensors.torch import load_file

    import train_sd3_adrpo

    out = tmp_path / "run"
    args = [*tiny_run_args, "--output_dir", str(out), "--num_iterations", "3", "--eval_every", "1",
            "--eval_num_prompts", "2", "--eval_images_per_prompt", "2", "--sample_every", "0",
            "--keep_best", "clip_score", "--alarms", "w2_divergence > 1e9 warn,brightness_change > -2 stop"]
    assert train_sd3_adrpo.main(args) == 3
    err = capsys.readouterr().err
    assert "brightness_change = " in err and "> -2" in err and "(iteration 1)" in err and "checkpoint-000001" in err
    assert "best/ holds the best policy by clip_score (iteration 1)" in err and "no best/" not in err
    rows = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("colour_entropy", "brightness", "saturation", "edge_density", "clip_diversity", "w2_divergence"):
        assert key in rows[1] and rows[0][f"{key}_change"] == 0.0
        assert rows[1][f"{key}_change"] == pytest.approx(rows[1][key] - rows[0][key])
    assert (out / "checkpoints" / "checkpoint-000001").is_dir() and not (out / "final").exists()
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"iteration": 1, "signal": "clip_score", "value": pytest.approx(rows[1]["clip_score"])}
    exported = load_file(out / "best" / "pytorch_lora_weights.safetensors")
    at_stop = load_file(out / "checkpoints" / "checkpoint-000001" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == at_stop.keys() and all((exported[k] == at_stop[k]).all() for k in exported)
    assert (out / "best" / "README.md").is_file() and (out / "monitor.png").stat().st_size > 0

    # resumed without the stop alarm (alarms may change on resume): it continues to the end, warning only
    resumed = list(args)
    resumed[resumed.index("--alarms") + 1] = "w2_divergence > -1 warn"
    assert train_sd3_adrpo.main([*resumed, "--resume_from", "latest"]) == 0
    assert "warning: alarm at iteration 3: w2_divergence" in capsys.readouterr().out
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["brightness_change"] == pytest.approx(rows[3]["brightness"] - rows[0]["brightness"])  # same base
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "alarm_w2_divergence" in metrics[-1]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == pytest.approx(max(r["clip_score"] for r in rows[1:]))


def test_alarm_settings_are_checked_before_anything_loads(tiny_run_args, tmp_path, capsys):
    import train_sd3_adrpo

    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*tiny_run_args, "--output_dir", str(out), "--eval_every", "1",
                                 "--alarms", "clip_diversity falls 3"]) == 2
    assert "alarms: alarm 'clip_diversity falls 3' is not" in capsys.readouterr().err
    assert train_sd3_adrpo.main([*tiny_run_args, "--output_dir", str(out), "--keep_best", "clip_score"]) == 2
    assert "set eval_every" in capsys.readouterr().err and not out.exists()
    assert train_sd3_adrpo.main([*tiny_run_args, "--output_dir", str(out), "--alarms", "train_w2 > 0.1",
                                 "--alarm_window", "0"]) == 2
    assert "alarm_window must be >= 1" in capsys.readouterr().err and not out.exists()


def test_an_alarm_on_a_signal_never_reported_is_said_at_the_first_evaluation(capsys):
    # a misspelt signal, and a relative change of W2 (whose base is 0, so it has none): neither could ever fire
    monitor = Monitor([parse_alarm("clip_diversty_rel_change < -0.15 stop"),
                       parse_alarm("w2_divergence_rel_change > 10 stop"),
                       parse_alarm("clip_diversity_rel_change < -0.15 stop")], keep_best="oracle_acc")
    monitor.observe(0, {"clip_diversity": 30.0, "w2_divergence": 0.0, "oracle_accuracy": 0.2})
    out = capsys.readouterr().out
    for name in ("clip_diversty_rel_change", "w2_divergence_rel_change", "oracle_acc"):
        assert f"warning: alarms/keep_best watch {name!r}" in out
    assert "watch 'clip_diversity_rel_change'" not in out
    monitor.observe(10, {"clip_diversity": 20.0, "w2_divergence": 0.1, "oracle_accuracy": 0.2})
    assert capsys.readouterr().out == ""  # said once


def test_a_stop_alarm_at_the_last_evaluation_writes_final_then_exits_3(tiny_run_args, tmp_path, capsys):
    import train_sd3_adrpo

    out = tmp_path / "run"
    args = [*tiny_run_args, "--output_dir", str(out), "--num_iterations", "1", "--eval_every", "1",
            "--eval_images_per_prompt", "2", "--sample_every", "0", "--alarms", "brightness_change > -2 stop"]
    assert train_sd3_adrpo.main(args) == 3
    err = capsys.readouterr().err
    assert "brightness_change = " in err and "at the last evaluation" in err and "not uploaded" in err
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_resumed_run_compares_with_the_base_evaluated_as_it_now_evaluates(tiny_run_args, tmp_path):
    """Resumed with another periodic-evaluation prompt set, the changes are against the base on that set (what a
    fresh run with it reports at iteration 0), not against the first run's row 0."""
    import json

    import train_sd3_adrpo

    def rows(d):
        return [json.loads(line) for line in (d / "eval_metrics.jsonl").read_text().splitlines()]

    common = [*tiny_run_args, "--eval_every", "1", "--eval_images_per_prompt", "2", "--sample_every", "0"]
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    assert train_sd3_adrpo.main([*common, "--output_dir", str(out), "--eval_num_prompts", "1",
                                 "--alarms", "brightness_change > -2 stop"]) == 3  # stops at iteration 1
    assert train_sd3_adrpo.main([*common, "--output_dir", str(out), "--eval_num_prompts", "3", "--resume_from",
                                 "latest", "--alarms", "w2_divergence > 1e9"]) == 0
    assert train_sd3_adrpo.main([*common, "--output_dir", str(fresh), "--eval_num_prompts", "3",
                                 "--num_iterations", "1"]) == 0
    base_on_3 = rows(fresh)[0]
    resumed = rows(out)[-1]
    assert resumed["iteration"] == 2 and rows(out)[0]["brightness"] != pytest.approx(base_on_3["brightness"])
    assert resumed["brightness_change"] == pytest.approx(resumed["brightness"] - base_on_3["brightness"])


def test_a_resume_with_another_keep_best_signal_keeps_the_old_best_aside_and_chooses_anew(tiny_run_args, tmp_path):
    """best/ chosen by clip_score at iteration 1; resumed with keep_best -w2_divergence, that folder is kept as
    best_by_clip_score_it1/ and best/ is chosen by the new signal among the evaluations after the resume only."""
    import json

    import train_sd3_adrpo

    out = tmp_path / "run"
    common = [*tiny_run_args, "--output_dir", str(out), "--num_iterations", "3", "--eval_every", "1",
              "--eval_num_prompts", "2", "--eval_images_per_prompt", "2", "--sample_every", "0"]
    assert train_sd3_adrpo.main([*common, "--keep_best", "clip_score", "--alarms", "brightness_change > -2 stop"]) == 3
    first = json.loads((out / "best" / "best.json").read_text())
    assert first["iteration"] == 1 and first["signal"] == "clip_score"
    assert train_sd3_adrpo.main([*common, "--keep_best=-w2_divergence", "--resume_from", "latest"]) == 0
    aside = out / "best_by_clip_score_it1"
    assert json.loads((aside / "best.json").read_text()) == first
    assert (aside / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    best = json.loads((out / "best" / "best.json").read_text())
    after = [r for r in rows if r["iteration"] >= 2]  # the resume was at iteration 1
    lowest = min(after, key=lambda r: r["w2_divergence"])
    assert best == {"iteration": lowest["iteration"], "signal": "-w2_divergence",
                    "value": pytest.approx(lowest["w2_divergence"])}


def test_training_alarms_watch_window_means_and_their_change_from_the_first_window():
    """train_ signals: the mean of a metrics.jsonl key over the last `window` iterations; its changes from the first
    window only once the windows share no iteration; an evaluation never sees them, nor they the evaluation."""
    monitor = Monitor([parse_alarm("train_reward_group_std_rel_change < -0.5 stop"),
                       parse_alarm("train_w2 > 0.1 warn"), parse_alarm("clip_diversity_rel_change < -0.15 stop")],
                      window=2)
    assert [a.signal for a in monitor.alarms] == ["clip_diversity_rel_change"]
    stds, w2s = [4.0, 2.0, 3.0, 2.0, 2.0, 0.5], [0.0, 0.02, 0.05, 0.3, 0.2, 0.1]
    seen = [monitor.observe_training(i + 1, {"iteration": i, "reward_group_std": s, "w2": w})
            for i, (s, w) in enumerate(zip(stds, w2s))]
    points = [p for p, _ in seen]
    assert points[0] == {"train_reward_group_std": 4.0, "train_w2": 0.0}
    assert points[2]["train_reward_group_std"] == pytest.approx(2.5) and "train_w2_change" not in points[2]
    # iteration 4: the last two (3, 2) against the first two (4, 2): 2.5 vs 3; w2 0.175 vs 0.01
    assert points[3]["train_reward_group_std_rel_change"] == pytest.approx(-1 / 6)
    assert points[3]["train_w2_change"] == pytest.approx(0.165)
    assert points[3]["train_w2_rel_change"] == pytest.approx(16.5)
    fired = [[(f.alarm.signal, f.iteration) for f in firings] for _, firings in seen]
    # w2's mean passes 0.1 at iteration 4 (0.175) and stays (0.25, 0.15); group std falls by more than half at
    # iteration 6 (1.25 against 3)
    assert fired[:3] == [[], [], []] and fired[3] == [("train_w2", 4)] and fired[4] == [("train_w2", 5)]
    assert fired[5] == [("train_reward_group_std_rel_change", 6), ("train_w2", 6)]
    assert points[5]["train_reward_group_std_rel_change"] == pytest.approx(1.25 / 3 - 1)
    # the evaluation's alarms ignore train_ signals
    _, firings, _ = monitor.observe(10, {"clip_diversity": 30.0, "train_w2": 5.0})
    assert firings == []
    # resumed from the rows so far, the windows continue as if never stopped
    resumed = Monitor(monitor.alarms + monitor.training_alarms, window=2)
    resumed.resume_training([{"iteration": i, "reward_group_std": s, "w2": w}
                             for i, (s, w) in enumerate(zip(stds, w2s))])
    row = {"iteration": 6, "reward_group_std": 0.5, "w2": 0.0}
    assert resumed.observe_training(7, row)[0] == pytest.approx(monitor.observe_training(7, dict(row))[0])


def test_a_training_alarm_stops_a_run_with_no_evaluation_at_all(tiny_run_args, tmp_path, capsys):
    """train_ alarms need no eval_every: checked after every iteration, a stop checkpoints there and exits 3, naming
    the signal; its values are in metrics.jsonl and monitor.png. A misspelt key is said at the first iteration."""
    import json

    import train_sd3_adrpo

    out = tmp_path / "run"
    args = [*tiny_run_args, "--output_dir", str(out), "--num_iterations", "4", "--sample_every", "0",
            "--alarm_window", "1", "--alarms", "train_reward_mean_change > -1e9 stop,train_reward_meen > 0 warn"]
    assert train_sd3_adrpo.main(args) == 3
    captured = capsys.readouterr()
    assert "train_reward_meen" in captured.out and "no 'reward_meen'" in captured.out
    # windows of 1 share no iteration from the second on: the change exists there, and trips at once
    assert "train_reward_mean_change = " in captured.err and "(iteration 2)" in captured.err
    assert (out / "checkpoints" / "checkpoint-000002").is_dir() and not (out / "final").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "train_reward_mean_change" not in rows[0]
    assert rows[1]["train_reward_mean_change"] == pytest.approx(rows[1]["reward_mean"] - rows[0]["reward_mean"])
    assert rows[1]["alarm_train_reward_mean_change"] == rows[1]["train_reward_mean_change"]
    assert (out / "monitor.png").stat().st_size > 0 and not (out / "eval_metrics.jsonl").exists()


def test_a_training_alarm_before_the_first_evaluation_says_there_is_no_best_yet(tiny_run_args, tmp_path, capsys):
    """keep_best exports best/ at evaluations after the base only: a train_ stop before the first of them leaves no
    best/, and the message says so rather than pointing at a folder that is not there."""
    import train_sd3_adrpo

    out = tmp_path / "run"
    args = [*tiny_run_args, "--output_dir", str(out), "--num_iterations", "4", "--sample_every", "0",
            "--eval_every", "4", "--eval_num_prompts", "1", "--eval_images_per_prompt", "2", "--keep_best",
            "clip_score", "--alarm_window", "1", "--alarms", "train_reward_mean_change > -1e9 stop"]
    assert train_sd3_adrpo.main(args) == 3
    err = capsys.readouterr().err
    assert "(iteration 2)" in err and "no best/: no evaluation after the base has reported clip_score yet" in err
    assert "best/ holds" not in err and not (out / "best").exists()
    assert (out / "checkpoints" / "checkpoint-000002").is_dir()
