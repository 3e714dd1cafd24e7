"""Every prompt of the world's grammar, and a seeded train/test split.

The test set has two parts. "Held-out" prompts are all those naming a colour-shape pair that
training never shows (e.g. no "purple triangle" anywhere in train, though purple things and
triangles are both there): reward fine-tuning that generalises should improve them too. "In
distribution" prompts are a random share of the rest, kept out of training only as prompts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .scene import COLOURS, COUNT_WORDS, RELATIONS, SHAPES, Group, SceneSpec, caption, parse

__all__ = ["all_specs", "all_prompts", "Split", "split", "train_prompts", "test_prompts", "prompt_kind"]

DEFAULT_SEED = 0
DEFAULT_HELDOUT_PAIRS = 3
DEFAULT_TEST_FRACTION = 0.1


def all_specs() -> list[SceneSpec]:
    """All scenes of the grammar, in a fixed order: single, count, pair, relation."""
    items = [(c, s) for c in COLOURS for s in SHAPES]
    specs = [SceneSpec((Group(c, s),)) for c, s in items]
    specs += [SceneSpec((Group(c, s, n),)) for n in COUNT_WORDS for c, s in items]
    pairs = [(a, b) for a, b in itertools.product(items, items) if a != b]
    specs += [SceneSpec((Group(*a), Group(*b))) for a, b in pairs]
    specs += [SceneSpec((Group(*a), Group(*b)), rel) for rel in RELATIONS for a, b in pairs]
    return specs


@lru_cache(maxsize=None)
def _all_prompts() -> tuple[str, ...]:
    return tuple(caption(s) for s in all_specs())


def all_prompts() -> list[str]:
    return list(_all_prompts())


def prompt_kind(prompt: str) -> str:
    """'single', 'count', 'pair' or 'relation' (GenEval's single object / counting / colour
    attribution / position)."""
    return parse(prompt).kind


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    test: tuple[str, ...]
    heldout_pairs: tuple[tuple[str, str], ...]  # (colour, shape) never seen in training
    test_heldout: tuple[str, ...]                # the part of test that names a held-out pair
    test_in_dist: tuple[str, ...]                # the rest of test


def _pick_heldout(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    # distinct colours, shapes cycled, so every colour keeps >= 2 shapes and every shape >= 5
    # colours in training: each word is still learnable, only the combination is new
    colours = list(COLOURS)
    if n > len(colours):
        raise ValueError(f"at most {len(colours)} held-out pairs")
    chosen = rng.permutation(len(colours))[:n]
    shapes = rng.permutation(len(SHAPES))
    return sorted((colours[c], SHAPES[shapes[i % len(SHAPES)]]) for i, c in enumerate(chosen))


@lru_cache(maxsize=None)
def split(seed: int = DEFAULT_SEED, heldout_pairs: int = DEFAULT_HELDOUT_PAIRS,
          test_fraction: float = DEFAULT_TEST_FRACTION) -> Split:
    rng = np.random.default_rng(seed)
    held = _pick_heldout(rng, heldout_pairs)
    held_set = set(held)
    prompts = _all_prompts()
    is_held = [any((g.colour, g.shape) in held_set for g in parse(p).groups) for p in prompts]
    rest = [p for p, h in zip(prompts, is_held) if not h]
    n_in = int(round(test_fraction * len(rest)))
    in_dist = set(rng.choice(len(rest), size=n_in, replace=False).tolist())
    test_in = tuple(p for i, p in enumerate(rest) if i in in_dist)
    train = tuple(p for i, p in enumerate(rest) if i not in in_dist)
    test_held = tuple(p for p, h in zip(prompts, is_held) if h)
    return Split(train=train, test=test_held + test_in, heldout_pairs=tuple(held),
                 test_heldout=test_held, test_in_dist=test_in)


def train_prompts(seed: int = DEFAULT_SEED) -> list[str]:
    return list(split(seed).train)


def test_prompts(seed: int = DEFAULT_SEED) -> list[str]:
    return list(split(seed).test)
