import pytest

from sd3_adrpo.prompts import PromptSampler, load_prompts, seeded_subset


def test_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "category": "x"}\n')
    (tmp_path / "p.csv").write_text('prompt,category\na cat,x\n"a dog, sitting",y\n')
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.csv") == ["a cat", "a dog, sitting"]


@pytest.mark.parametrize("name, content, message", [
    ("e.txt", "# only a comment\n\n", "no prompts"),
    ("b.jsonl", '{"prompt": "ok"}\nnot json\n', "b.jsonl:2: invalid JSON"),
    ("k.jsonl", '{"text": "ok"}\n', "needs a string field"),
    ("c.csv", "text\nhello\n", "'prompt' column"),
])
def test_malformed_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(tmp_path / name)


def test_non_utf8(tmp_path):
    (tmp_path / "l.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        load_prompts(tmp_path / "l.txt")


def test_sampler_covers_each_pass_and_resumes():
    prompts = [f"p{i}" for i in range(7)]
    s = PromptSampler(prompts, seed=3)
    first = s.next(3) + s.next(3)
    assert len(set(first)) == 6  # distinct within a pass
    state = s.state_dict()
    following = [s.next(3) for _ in range(4)]
    t = PromptSampler(prompts, seed=3)
    t.load_state_dict(state)
    assert [t.next(3) for _ in range(4)] == following
    with pytest.raises(ValueError, match="lower prompts_per_iteration"):
        s.next(8)


def test_hub_dataset_files(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        (tmp_path / filename).write_text("prompt,category\na cat,x\na dog,y\n")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_prompts("hf://datasets/someone/drawbench/prompts.csv") == ["a cat", "a dog"]
    assert calls == [("someone/drawbench", "prompts.csv", "dataset")]
    with pytest.raises(ValueError, match="expected hf://datasets/<org>/<name>/<file"):
        load_prompts("hf://datasets/someone/drawbench")


def test_hub_dataset_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass its local path instead"):
        load_prompts("hf://datasets/no-such-org/no-such-set/prompts.csv")


def test_seeded_subset_represents_a_category_ordered_file():
    from pathlib import Path

    from tinyworld.grammar import parse

    heldout = load_prompts(Path(__file__).parents[1] / "prompts/tinyworld_heldout.txt")
    sub = seeded_subset(heldout, 60, 0)
    assert len(sub) == 60 == len(set(sub)) and set(sub) <= set(heldout)
    assert sub == sorted(sub, key=heldout.index)  # file order kept
    assert sub == seeded_subset(heldout, 60, 0) and sub != seeded_subset(heldout, 60, 1)
    assert seeded_subset(heldout, 0, 0) == heldout == seeded_subset(heldout, 10_000, 0)
    # the file is ordered by category: its first 60 prompts have no binding prompt, a random 60 do
    categories = lambda ps: {parse(p).category for p in ps}  # noqa: E731
    assert "binding" not in categories(heldout[:60]) and "binding" in categories(sub)


def test_prompt_records_keep_the_other_fields_as_metadata(tmp_path):
    from sd3_adrpo.prompts import load_prompt_records, prompt_metadata

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": " two blue squares ", "tag": "counting", "include": [{"class": "square", "count": 2}]}\n'
                  '{"prompt": "a red circle"}\n')
    records = load_prompt_records(jl)
    assert records == [{"prompt": "two blue squares", "tag": "counting", "include": [{"class": "square", "count": 2}]},
                       {"prompt": "a red circle"}]
    assert prompt_metadata(records) == {"two blue squares": {"tag": "counting", "include": [{"class": "square",
                                                                                              "count": 2}]},
                                        "a red circle": {}}
    cs = tmp_path / "p.csv"
    cs.write_text("prompt,category\na red circle,colour\n")
    assert load_prompt_records(cs) == [{"prompt": "a red circle", "category": "colour"}]
    with pytest.raises(ValueError, match="appears twice with different fields"):
        prompt_metadata([{"prompt": "a", "x": 1}, {"prompt": "a", "x": 2}])
