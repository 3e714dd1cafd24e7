"""The procedural world: grammar, renderer, prompt split, judge, text encoder."""
from collections import Counter

import numpy as np
import pytest
import torch

from engine.world import prompts as world_prompts  # (its test_prompts() is no pytest test)
from engine.world.judge import by_kind, components, judge
from engine.world.prompts import all_prompts, prompt_kind, split
from engine.world.scene import (COLOURS, RELATIONS, SHAPES, Group, SceneSpec, caption, layout, parse,
                                render, render_batch)


def _sample(prompts, n, seed):
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.choice(len(prompts), size=n, replace=False)]


def _stratified(n_per_kind, seed):
    by = {}
    for p in all_prompts():
        by.setdefault(prompt_kind(p), []).append(p)
    out = []
    for k, ps in sorted(by.items()):
        out += _sample(ps, min(n_per_kind, len(ps)), seed)
    return out


# --- grammar -----------------------------------------------------------------------------------

def test_prompt_set_and_round_trip():
    ps = all_prompts()
    assert len(ps) == len(set(ps)) == 2184
    assert Counter(prompt_kind(p) for p in ps) == {"single": 21, "count": 63, "pair": 420, "relation": 1680}
    for p in ps:
        assert caption(parse(p)) == p
    assert "an orange circle left of a blue square" in ps and "three purple triangles" in ps


def test_parse_forgives_case_spaces_and_article():
    assert parse("  A  Red   Circle ") == SceneSpec((Group("red", "circle"),))
    assert parse("an red circle") == parse("a red circle")
    assert parse("two blue squares") == SceneSpec((Group("blue", "square", 2),))
    s = parse("a red circle above a blue triangle")
    assert s.relation == "above" and s.kind == "relation"


@pytest.mark.parametrize("bad", ["", "a red dog", "two red circle", "a red circle and a red circle",
                                 "five red circles", "a red circle near a blue square",
                                 "two red circles left of a blue square", "a photo of a red circle"])
def test_parse_rejects_prompts_outside_the_grammar(bad):
    with pytest.raises(ValueError) as e:
        parse(bad)
    assert repr(bad) in str(e.value)


# --- renderer ----------------------------------------------------------------------------------

def test_render_is_deterministic_and_in_range():
    p = "a red circle left of a blue square"
    a, b, c = render(p, 3), render(p, 3), render(p, 4)
    assert a.shape == (3, 64, 64) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # same seed, other prompt: another layout, not the same one recoloured
    o1 = layout(parse("a red circle and a blue square"), 3)
    o2 = layout(parse("a green circle and a blue square"), 3)
    assert (o1[0].cx, o1[0].cy) != (o2[0].cx, o2[0].cy)
    for size in (32, 128):
        assert render(p, 3, size=size).shape == (3, size, size)
    batch = render_batch([p, "two green triangles"], [0, 1])
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert torch.equal(batch[0], torch.from_numpy(render(p, 0)))


def test_layouts_keep_captions_true():
    unit_gap = 3.0
    for i, p in enumerate(_stratified(40, 0)):
        spec = parse(p)
        objs = layout(spec, i)
        assert Counter((o.colour, o.shape) for o in objs) == {(g.colour, g.shape): g.count for g in spec.groups}
        for j, a in enumerate(objs):
            hx, hy = a.half_extent
            assert hx <= a.cx <= 64 - hx and hy <= a.cy <= 64 - hy
            for b in objs[j + 1:]:  # boxes apart: components never merge
                bx, by = b.half_extent
                assert abs(a.cx - b.cx) >= hx + bx + unit_gap or abs(a.cy - b.cy) >= hy + by + unit_gap
        if spec.relation:
            a, b = objs
            d = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
            assert d[spec.relation] >= 10.0


# --- split -------------------------------------------------------------------------------------

def test_split_is_disjoint_complete_and_holds_out_pairs():
    s = split()
    train, test = set(s.train), set(s.test)
    assert not train & test and train | test == set(all_prompts())
    assert set(s.test_heldout) | set(s.test_in_dist) == test
    assert 1000 <= len(train) <= 2000 and 300 <= len(test) <= 1000
    held = set(s.heldout_pairs)
    assert len(held) == 3
    seen_pairs = {(g.colour, g.shape) for p in train for g in parse(p).groups}
    assert not held & seen_pairs
    # every word is still trained; only the combination is new
    assert {c for c, _ in seen_pairs} == set(COLOURS) and {sh for _, sh in seen_pairs} == set(SHAPES)
    assert {parse(p).relation for p in train} >= set(RELATIONS)
    for p in s.test_heldout:
        assert any((g.colour, g.shape) in held for g in parse(p).groups)
    assert world_prompts.train_prompts() == list(s.train) and world_prompts.test_prompts() == list(s.test)
    assert split(1).heldout_pairs != s.heldout_pairs or split(1).test_in_dist != s.test_in_dist


# --- judge -------------------------------------------------------------------------------------

def test_judge_scores_true_renders_near_one():
    prompts = _stratified(60, 1)  # 21 single + 60 count + 60 pair + 60 relation
    images = render_batch(prompts, range(1000, 1000 + len(prompts)))
    r = judge(images, prompts)
    assert r.score.shape == (len(prompts),) and r.correct.dtype == bool
    assert r.mean() >= 0.95 and r.accuracy() >= 0.95
    table = by_kind(r, prompts)
    assert all(v["score"] >= 0.95 for v in table.values())
    # one prompt over many seeds
    p = "three orange triangles"
    r = judge(render_batch([p] * 40, range(40)), [p] * 40)
    assert r.mean() >= 0.95


def _perturb(p, mode):
    s = parse(p)
    g = list(s.groups)
    taken = {(h.colour, h.shape) for h in g[1:]}
    if mode == "colour":
        c = next(c for c in COLOURS if c != g[0].colour and (c, g[0].shape) not in taken)
        g[0] = Group(c, g[0].shape, g[0].count)
    elif mode == "shape":
        sh = next(x for x in SHAPES if x != g[0].shape and (g[0].colour, x) not in taken)
        g[0] = Group(g[0].colour, sh, g[0].count)
    elif mode == "relation":
        if not s.relation:
            return None
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return caption(SceneSpec(s.groups, flip[s.relation]))
    elif mode == "count":
        if len(g) > 1:
            return None
        g[0] = Group(g[0].colour, g[0].shape, 2 if g[0].count != 2 else 3)
    return caption(SceneSpec(tuple(g), s.relation))


def test_judge_rejects_wrong_prompts():
    prompts = _stratified(40, 2)
    images = render_batch(prompts, range(len(prompts)))
    true = judge(images, prompts)
    for mode in ("colour", "shape", "relation", "count"):
        idx = [i for i, p in enumerate(prompts) if _perturb(p, mode)]
        wrong = judge(images[idx], [_perturb(prompts[i], mode) for i in idx])
        assert wrong.accuracy() <= 0.05, mode
        assert wrong.mean() <= true.score[idx].mean() - 0.1, mode
    shuffled = [prompts[(i + 7) % len(prompts)] for i in range(len(prompts))]
    assert judge(images, shuffled).mean() < 0.4


def test_judge_extra_objects_fail():
    img = render("a red circle and a blue square", 0)
    r = judge(img, "a red circle")
    assert not r.correct[0] and r.clauses[0]["no extra objects"] is False
    assert r.clauses[0]["count red circle"] is True


def test_judge_scores_noise_and_blank_low():
    prompts = _sample(all_prompts(), 50, 3)
    noise = torch.rand(50, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for images in (noise, torch.zeros(50, 3, 64, 64), torch.full((50, 3, 64, 64), 0.5)):
        r = judge(images, prompts)
        assert r.mean() < 0.3 and not r.correct.any()


def test_judge_tolerates_mild_noise_and_blur():
    prompts = _stratified(25, 4)
    images = render_batch(prompts, range(len(prompts)))
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert judge(noisy, prompts).accuracy() >= 0.95
    k = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)  # Gaussian, sigma 1 pixel
    k2 = (k[:, None] * k[None, :] / k.sum() ** 2).expand(3, 1, 7, 7)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (3,) * 4, mode="replicate"), k2, groups=3)
    assert judge(blurred, prompts).accuracy() >= 0.95


def test_judge_inputs():
    img = render("a green square", 0)
    assert judge(img, "a green square").correct.tolist() == [True]  # (3, H, W) and one prompt
    assert judge(torch.from_numpy(img)[None].double(), ["a green square"]).correct.tolist() == [True]
    assert judge(render("a green square", 0, size=128), "a green square").correct.tolist() == [True]
    with pytest.raises(ValueError, match="2 prompts"):
        judge(img, ["a green square"] * 2)
    with pytest.raises(ValueError, match="a green dog"):
        judge(img, "a green dog")
    found = components(img)[0]
    assert [(c.colour, c.shape) for c in found] == [("green", "square")]


# --- text encoder ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from engine.world.text import MiniLMTextEncoder

    return MiniLMTextEncoder(max_length=16)


def test_minilm_encoder_shapes_and_determinism(minilm):
    prompts = ["a red circle", "two blue squares", "an orange triangle left of a white circle"]
    tokens, pooled = minilm.encode(prompts)
    assert tokens.shape == (3, 16, 384) and pooled.shape == (3, 384)
    assert tokens.dtype == pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    _, _, mask = minilm.encode_with_mask(prompts)
    assert mask.sum(1).tolist() == [5, 5, 10]  # [CLS] ... [SEP]
    assert (tokens[~mask] == 0).all() and (tokens[mask].abs().sum(-1) > 0).all()
    # uncached recomputation, another batch: the same values
    t2, p2, _ = minilm.encode_with_mask(prompts[::-1])
    torch.testing.assert_close(t2.flip(0), tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2.flip(0), pooled, atol=1e-5, rtol=1e-5)
    t3, p3 = minilm.encode(prompts[1])
    assert torch.equal(t3[0], tokens[1]) and torch.equal(p3[0], pooled[1])
    # a pretrained encoder: a colour swap is closer than an unrelated prompt
    _, q = minilm.encode(["a red circle", "a blue circle", "three white triangles"])
    assert q[0] @ q[1] > q[0] @ q[2]


def test_minilm_fits_every_prompt(minilm):
    longest = max(all_prompts(), key=lambda p: len(p.split()))
    assert len(minilm.tokenizer(longest)["input_ids"]) <= minilm.max_length
    with pytest.raises(ValueError, match="max_length"):
        minilm.encode_with_mask([" ".join(["red"] * 40)])


def test_hash_fallback_same_widths():
    from engine.world.text import load_text_encoder

    enc = load_text_encoder("hash")
    tokens, pooled = enc.encode(["a red circle", "two blue squares"])
    assert tokens.shape == (2, 16, 384) and pooled.shape == (2, 384)
    with pytest.raises(ValueError):
        load_text_encoder("clip")
