"""LeapAlign engine: reward fine-tuning of Flux models with two-step leap trajectories.

``from engine import LeapTrainer`` is the public entry point; the estimator itself is
``engine.leap.leapalign`` and the baselines live in ``engine.methods``.
"""


def __getattr__(name):
    # Lazy, so `import engine.schedule` stays light (the trainer pulls in diffusers and peft).
    if name == "LeapTrainer":
        from engine.trainer import LeapTrainer

        return LeapTrainer
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = ["LeapTrainer"]
