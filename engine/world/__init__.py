"""A small procedural text-to-image world where reward fine-tuning can be seen to work.

scene    scene specs, the caption grammar (caption/parse) and the numpy renderer
prompts  every prompt of the grammar and the seeded train/test split
judge    the held-out, analysis-only evaluator (GenEval's role): engine.world.judge.judge
         (the function is not re-exported here, so that engine.world.judge stays the module)
text     the offline all-MiniLM-L6-v2 text encoder (imported on first use: it loads transformers)
"""
from .judge import JudgeResult, by_kind
from .prompts import all_prompts, prompt_kind, split, test_prompts, train_prompts
from .scene import COLOURS, RELATIONS, SHAPES, Group, SceneSpec, caption, parse, render, render_batch

__all__ = [
    "COLOURS", "SHAPES", "RELATIONS", "Group", "SceneSpec", "caption", "parse", "render", "render_batch",
    "all_prompts", "train_prompts", "test_prompts", "split", "prompt_kind",
    "by_kind", "JudgeResult", "MiniLMTextEncoder", "load_text_encoder",
]


def __getattr__(name):
    if name in ("MiniLMTextEncoder", "load_text_encoder"):
        from . import text

        return getattr(text, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
