"""Minimal edits of a scene spec: the losing side of the world reward's preference pairs.

Each edit changes exactly one thing a prompt asserts (a colour, a shape, a count, the relation,
an object dropped or added), so a render of the edited spec is a near miss for the original
prompt, the kind of mistake a text-to-image model makes, and a reward trained to rank the true
render above it must read attributes, counts, positions and their binding.
"""
from __future__ import annotations

import numpy as np

from .scene import COLOURS, COUNT_WORDS, RELATIONS, SHAPES, Group, SceneSpec

__all__ = ["EDITS", "applicable", "perturb"]

_COLOURS = tuple(COLOURS)
_COUNTS = (1, *COUNT_WORDS)
# relations whose render certainly violates the original one ("and" would not)
_OPPOSITE = {"left of": ("right of", "above", "below"), "right of": ("left of", "above", "below"),
             "above": ("below", "left of", "right of"), "below": ("above", "left of", "right of")}


def _other(rng: np.random.Generator, options, current):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _edit_colour(spec, rng):
    i = int(rng.integers(len(spec.groups)))
    g = list(spec.groups)
    g[i] = Group(_other(rng, _COLOURS, g[i].colour), g[i].shape, g[i].count)
    return SceneSpec(tuple(g), spec.relation)


def _edit_shape(spec, rng):
    i = int(rng.integers(len(spec.groups)))
    g = list(spec.groups)
    g[i] = Group(g[i].colour, _other(rng, SHAPES, g[i].shape), g[i].count)
    return SceneSpec(tuple(g), spec.relation)


def _edit_count(spec, rng):
    if len(spec.groups) != 1:
        return None
    g = spec.groups[0]
    return SceneSpec((Group(g.colour, g.shape, _other(rng, _COUNTS, g.count)),))


def _edit_relation(spec, rng):
    if spec.relation is None:
        return None
    rel = spec.relation
    options = _OPPOSITE[rel]
    # half of the time keep the words and swap the objects' roles: same words, wrong layout
    if rng.random() < 0.5:
        return SceneSpec((spec.groups[1], spec.groups[0]), rel)
    return SceneSpec(spec.groups, options[int(rng.integers(len(options)))])


def _edit_drop(spec, rng):
    if len(spec.groups) == 2:
        return SceneSpec((spec.groups[int(rng.integers(2))],))
    g = spec.groups[0]
    return None if g.count == 1 else SceneSpec((Group(g.colour, g.shape, g.count - 1 if g.count > 2 else 1),))


def _edit_add(spec, rng):
    if len(spec.groups) != 1 or spec.groups[0].count != 1:
        return None
    extra = Group(_COLOURS[int(rng.integers(len(_COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))])
    rel = None if rng.random() < 0.5 else RELATIONS[int(rng.integers(len(RELATIONS)))]
    return SceneSpec((spec.groups[0], extra), rel)


EDITS = {"colour": _edit_colour, "shape": _edit_shape, "count": _edit_count, "relation": _edit_relation,
         "drop": _edit_drop, "add": _edit_add}


def applicable(spec: SceneSpec) -> list[str]:
    """The edit kinds that can change ``spec`` (e.g. no relation edit of a single object)."""
    out = []
    for name in EDITS:
        if name == "count" and len(spec.groups) != 1:
            continue
        if name == "relation" and spec.relation is None:
            continue
        if name == "drop" and len(spec.groups) == 1 and spec.groups[0].count == 1:
            continue
        if name == "add" and (len(spec.groups) != 1 or spec.groups[0].count != 1):
            continue
        out.append(name)
    return out


def perturb(spec: SceneSpec, rng: np.random.Generator, max_tries: int = 50,
            weights: dict[str, float] | None = None, kinds=None) -> tuple[SceneSpec, str]:
    """A spec that differs from ``spec`` by one edit, and the edit's name. Edits that do not
    apply to this kind of spec, or that give an invalid scene (two identical objects), are
    redrawn. ``kinds`` restricts the edits to those names; ``weights`` (name -> relative weight,
    default 1) draws some kinds more often than others among those that apply."""
    names = [n for n in applicable(spec) if kinds is None or n in kinds]
    if not names:
        raise ValueError(f"no edit of kind {sorted(kinds or EDITS)} applies to {spec}")
    p = np.asarray([1.0 if weights is None else float(weights.get(n, 1.0)) for n in names])
    p = p / p.sum()
    for _ in range(max_tries):
        name = names[int(rng.choice(len(names), p=p))]
        try:
            out = EDITS[name](spec, rng)
        except ValueError:
            continue
        if out is not None and out != spec:
            return out, name
    raise RuntimeError(f"no edit of {spec} found in {max_tries} tries")
