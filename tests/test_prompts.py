import json

import pytest

from engine.config import load_config
from engine.prompts import load_prompt_split, load_prompts, split_prompts


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_text_file(tmp_path):
    p = write(tmp_path / "p.txt", "# a comment\n a red square \n\n   # indented comment\na blue #1 circle\na red square\n")
    assert load_prompts(p) == ["a red square", "a blue #1 circle"]


@pytest.mark.parametrize("data", [
    ["a cat", "a dog", " ", "a cat"],
    [{"prompt": "a cat", "image_path": ["x.jpg"]}, {"caption": "a dog"}, {"prompt": "a cat"}],
    [{"prompt": "a cat", "caption": "ignored"}, "a dog"],
])
def test_json_file(tmp_path, data):
    p = write(tmp_path / "p.json", json.dumps(data))
    assert load_prompts(p) == ["a cat", "a dog"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="empty.txt holds no prompts"):
        load_prompts(write(tmp_path / "empty.txt", "# only a comment\n\n"))
    with pytest.raises(ValueError, match="empty.json holds no prompts"):
        load_prompts(write(tmp_path / "empty.json", "[]"))
    with pytest.raises(ValueError, match=r"malformed JSON in prompt file .*bad.json.*line 1 column"):
        load_prompts(write(tmp_path / "bad.json", '["a cat", '))
    with pytest.raises(ValueError, match=r"obj.json.*expected a JSON list"):
        load_prompts(write(tmp_path / "obj.json", '{"prompt": "a cat"}'))
    with pytest.raises(ValueError, match=r"field.json: entry 1 has no string field 'prompt' or 'caption'"):
        load_prompts(write(tmp_path / "field.json", '["a cat", {"text": "a dog"}]'))
    with pytest.raises(ValueError, match=r"num.json: entry 0 is a int"):
        load_prompts(write(tmp_path / "num.json", "[3]"))


def test_split_is_seeded_and_order_free():
    prompts = [f"prompt {i}" for i in range(100)]
    train, test = split_prompts(prompts, 0.2, seed=0)
    assert len(test) == 20 and len(train) == 80 and not set(train) & set(test)
    assert set(train) | set(test) == set(prompts)
    assert train == [p for p in prompts if p in set(train)]           # file order kept
    assert split_prompts(prompts, 0.2, seed=0) == (train, test)       # deterministic
    assert sorted(split_prompts(prompts[::-1], 0.2, seed=0)[1]) == sorted(test)  # order-free
    assert split_prompts(prompts, 0.2, seed=1)[1] != test              # seeded
    # adding a prompt moves at most one old prompt (the one at the cut-off) across the split
    for i in range(5):
        _, test_more = split_prompts(prompts + [f"new {i}"], 0.2, seed=0)
        assert len((set(test) ^ set(test_more)) - {f"new {i}"}) <= 1
    assert split_prompts(prompts, 0.0) == (prompts, [])
    assert split_prompts(prompts[:3], 0.01)[1] and len(split_prompts(prompts[:3], 0.01)[1]) == 1
    with pytest.raises(ValueError, match="no training prompt"):
        split_prompts(["only one"], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_prompts(prompts, 1.0)


def test_config_and_trainer_use_the_file(tmp_path):
    from engine import LeapTrainer

    p = write(tmp_path / "p.txt", "\n".join(f"a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green"] * 3 + ["white"])))
    with pytest.raises(ValueError, match="test_fraction"):
        load_config(None, ["test_fraction=0.2"])            # needs prompt_file
    with pytest.raises(ValueError, match="test_fraction"):
        load_config(None, [f"prompt_file={p}", "test_fraction=1.5"])
    cfg = load_config(None, [f"prompt_file={p}", "test_fraction=0.3", "samples=2", "num_steps=2",
                             "model.height=32", "model.width=32", f"output_dir={tmp_path}"])
    t = LeapTrainer(cfg)
    train, test = load_prompt_split(p, 0.3, seed=0)
    assert (t.prompts, t.test_prompts) == (train, test) and len(test) == 3
    # a fixed-seed subsample of the held-out prompts (not the first few: a split may be ordered)
    ev = t.eval_set
    assert len(ev) == 2 and set(ev) <= set(test) and len(set(ev)) == 2 and ev == LeapTrainer(cfg).eval_set
    t.step()
    cfg2 = load_config(None, [f"prompt_file={p}", "eval_prompts=[a red cat]", "samples=2", "num_steps=2",
                              f"output_dir={tmp_path}"])
    assert LeapTrainer(cfg2).eval_set == ["a red cat"]   # each eval prompt once, not repeated to fill `samples`
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        LeapTrainer(load_config(None, [f"prompt_file={tmp_path / 'missing.txt'}"]))
