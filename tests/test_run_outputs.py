"""What a finished run leaves a user: tensorboard events with scalars and pictures, a model card beside the LoRA whose
usage snippet works on the tiny world, and the folder as it goes to the hub (the upload call replaced)."""

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

import train_sd3_adrpo

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "a red circle\na blue square\na green triangle\ntwo red squares\na blue circle to the left of a red square\n"


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    """Two iterations on the stand-ins with tensorboard, eval_every, a final evaluation and push_to_hub, the hub's
    create_repo / upload_folder replaced by recorders. Returns (output_dir, what the upload saw, stdout)."""
    tmp = tmp_path_factory.mktemp("run")
    prompts = tmp / "p.txt"
    prompts.write_text(PROMPTS)
    out = tmp / "run"
    uploads = []

    class Repo:
        repo_id = "someone/tiny-adrpo"

    def create_repo(self, repo_id, **kwargs):
        uploads.append(("create", repo_id))
        return Repo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploads.append(("upload", repo_id, sorted(p.name for p in folder.iterdir()), (folder / "README.md").read_text()))

    import huggingface_hub

    import sd3_adrpo.config as config

    args = ["--config", str(ROOT / "configs/tiny_random.yaml"), "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", str(prompts),
            "--final_eval_prompts", str(prompts), "--final_eval_num_prompts", "2", "--final_eval_images_per_prompt", "2",
            "--eval_every", "1", "--eval_num_prompts", "2", "--eval_images_per_prompt", "2", "--num_iterations", "2",
            "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "2",
            "--num_inference_steps", "3", "--checkpoint_every", "1", "--sample_every", "1", "--num_sample_prompts", "2",
            "--sample_images_per_prompt", "2", "--learning_rate", "5e-2", "--report_to", "tensorboard",
            "--push_to_hub", "--output_dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        mp.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        mp.setattr(config, "_offline", lambda: False)  # push_to_hub is refused offline; the hub here is the recorder
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            assert train_sd3_adrpo.main(args) == 0
    return out, uploads, buffer.getvalue()


def test_banner_is_printed_at_start(finished_run):
    _, _, stdout = finished_run
    assert stdout.startswith("sd3-adrpo: adrpo on ")
    assert "2 prompts x 2 samples = 4 images" in stdout and "2 iterations = 4 optimizer steps, 8 images" in stdout


def test_tensorboard_events_hold_the_scalars_and_the_pictures(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = finished_run
    events = EventAccumulator(str(out / "logs" / "sd3-adrpo"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("reward_mean", "loss", "w2", "adv_frac_clipped", "eval_clip_score", "eval_w2_divergence"):
        assert key in tags["scalars"], key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("reward_mean")
    assert [e.step for e in logged] == [0, 1]  # one point per iteration, the same numbers as metrics.jsonl
    assert [e.value for e in logged] == pytest.approx([r["reward_mean"] for r in rows])
    assert {"samples", "tradeoff", "final_eval/base_vs_trained"} <= set(tags["images"])
    # the base's grid at 0, then the grid after iteration k at k, as samples/iter_<k>.png; the periodic evaluation
    # after k iterations at k too, as eval_metrics.jsonl numbers it
    assert [e.step for e in events.Images("samples")] == [0, 1, 2]
    evals = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("eval_clip_score")] == [r["iteration"] for r in evals]  # the base's at 0
    assert [e.value for e in events.Scalars("eval_clip_score")] == pytest.approx([r["clip_score"] for r in evals])
    from PIL import Image

    for tag in ("samples", "tradeoff", "final_eval/base_vs_trained"):
        event = events.Images(tag)[-1]
        image = Image.open(io.BytesIO(event.encoded_image_string))
        assert (image.width, image.height) == (event.width, event.height) and image.width > 200, tag
    # the logged grid is the PNG written to samples/
    last = np.asarray(Image.open(io.BytesIO(events.Images("samples")[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(last, np.asarray(Image.open(out / "samples" / "iter_000002.png").convert("RGB")))


def test_model_card_beside_the_lora(finished_run, tiny_models):
    out, _, _ = finished_run
    card = (out / "final" / "README.md").read_text()
    from huggingface_hub import ModelCard

    data = ModelCard(card).data  # the hub's metadata header parses
    assert data.library_name == "diffusers" and "lora" in data.tags and "adrpo" in data.tags
    assert data.base_model is None  # a local base is named in the text, not as a hub id
    assert str(tiny_models["sd3"]) in card and "beta0 | 1" in card and "| method | adrpo |" in card
    assert "text_encoder_3=None, tokenizer_3=None" in card and "max_sequence_length=4" in card
    assert "## Before and after" in card and "| clip_score |" in card and "2 held-out prompts x 2 images" in card


def test_every_checkpoint_export_has_its_card(finished_run):
    out, _, _ = finished_run
    ckpt = out / "checkpoints" / "checkpoint-000001"
    card = (ckpt / "README.md").read_text()
    assert f"pipe.load_lora_weights({str(ckpt)!r})" in _snippet(card)  # where it lies once in place, not .tmp-*
    assert "| iterations | 1 of 2 |" in card and "README.md" in (ckpt / "manifest.json").read_text()


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_the_cards_snippet_runs_on_the_tiny_world_and_the_lora_changes_the_image(finished_run, tmp_path,
                                                                                 monkeypatch):
    out, uploads, _ = finished_run
    monkeypatch.chdir(tmp_path)  # the snippet saves sample.png where it runs
    code = _snippet((out / "final" / "README.md").read_text())
    assert f"pipe.load_lora_weights({str(out / 'final')!r})" in code
    trained, base = {}, {}
    exec(code, trained)
    assert (tmp_path / "sample.png").is_file()
    exec(code.replace(f"pipe.load_lora_weights({str(out / 'final')!r})", ""), base)  # the same without the LoRA
    a, b = (np.asarray(ns["image"], dtype=float) for ns in (trained, base))
    assert a.shape == (64, 64, 3) and np.abs(a - b).mean() > 1.0  # the LoRA is loaded and changes the picture


def test_push_to_hub_uploads_the_folder_with_a_card_that_loads_from_the_hub(finished_run):
    out, uploads, _ = finished_run
    assert uploads[0] == ("create", "run")  # no hub_model_id: the output folder's name under the user's account
    _, repo_id, files, card = uploads[1]
    assert repo_id == "someone/tiny-adrpo"
    assert files == ["README.md", "config.yaml", "pytorch_lora_weights.safetensors"]
    assert "pipe.load_lora_weights('someone/tiny-adrpo')" in _snippet(card)
    local = (out / "final" / "README.md").read_text()  # the local card loads it from the folder; nothing else differs
    assert card == local.replace(repr(str(out / "final")), "'someone/tiny-adrpo'")


def test_push_without_the_hub_is_refused_before_training(tmp_path, monkeypatch):
    from sd3_adrpo.config import ConfigError, make_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)  # the default prompt files are relative to the repository
    with pytest.raises(ConfigError, match="push_to_hub needs the hub"):
        make_config({"push_to_hub": True, "pretrained_model": "org/x", "output_dir": str(tmp_path / "o")}).validate()
