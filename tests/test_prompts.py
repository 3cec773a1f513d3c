import pytest

from sd3_adrpo.prompts import PromptSampler, load_prompts


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
