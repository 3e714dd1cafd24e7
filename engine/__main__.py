"""python -m engine {train, sample, eval, export}"""
from __future__ import annotations

import argparse
import json
import sys


def _cpu_settings(trainer) -> None:
    # The world's black backgrounds drive activations into denormals, which slow CPU float math
    # several-fold; flushing them changes nothing a float32 result can resolve. A process-wide
    # switch, so it is set here, by the application, not by the library.
    if trainer.device.type == "cpu":
        import torch

        torch.set_flush_denormal(True)


def _train(args) -> int:
    from engine.config import load_config
    from engine.trainer import LeapTrainer

    cfg = load_config(args.config, args.overrides)
    trainer = LeapTrainer(cfg)   # under torchrun (distributed=ddp|fsdp) this joins the job
    try:
        _cpu_settings(trainer)
        d = trainer.dist
        if d.main:
            print(f"device: {trainer.device}; method: {cfg.method.name} {trainer.method}; "
                  f"trainable parameters: {sum(p.numel() for p in trainer.params.values()):,}; "
                  f"{d.world} process(es) ({cfg.distributed}), global batch {trainer.global_batch} "
                  f"= {cfg.batch_size} x {cfg.grad_accum} micro-steps x {d.world}", flush=True)
        summary = trainer.train(resume=args.resume)
        if d.main:
            from engine.report import format_summary

            print(format_summary(summary))
    finally:
        trainer.dist.close()
    return 0


def _sample(args) -> int:
    from engine.report import save_grid
    from engine.trainer import LeapTrainer

    cfg = LeapTrainer.config_from_checkpoint(args.checkpoint)
    trainer = LeapTrainer(cfg)
    _cpu_settings(trainer)
    trainer.load_checkpoint(args.checkpoint)
    prompts = args.prompt * args.n
    if args.ema:
        with trainer.ema_weights():
            images, rewards = trainer.sample(prompts, seed=args.seed, num_steps=args.steps)
    else:
        images, rewards = trainer.sample(prompts, seed=args.seed, num_steps=args.steps)
    save_grid(images, args.out)
    for p, r in zip(prompts, rewards.tolist()):
        print(f"{r:.4f}  {p}")
    print(f"wrote {args.out}")
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from engine.config import apply_overrides, from_dict, load_config, to_dict
    from engine.report import save_grid, write_eval_table
    from engine.trainer import LeapTrainer

    if (args.checkpoint is None) == (args.config is None):
        raise SystemExit("eval needs exactly one of --checkpoint (a trained run) or --config (the base model)")
    if args.checkpoint:
        cfg = from_dict(apply_overrides(to_dict(LeapTrainer.config_from_checkpoint(args.checkpoint)), args.overrides))
    else:
        cfg = load_config(args.config, args.overrides)
    if args.n:
        cfg.eval_size = args.n
    trainer = LeapTrainer(cfg)
    _cpu_settings(trainer)
    if args.checkpoint:
        trainer.load_checkpoint(args.checkpoint)
    ema = bool(args.checkpoint) and not args.no_ema
    metrics, images = trainer.evaluate(seed=args.seed, ema=ema)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[: cfg.samples], out / "eval_grid.png")
    what = f"{args.checkpoint or args.config} ({'EMA' if ema else 'raw'} weights, step {trainer.step_count})"
    write_eval_table(metrics, out / "eval.md", what)
    (out / "eval.json").write_text(json.dumps({"source": what, **metrics}, indent=2))
    print((out / "eval.md").read_text())
    return 0


def _export(args) -> int:
    from engine.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, lora=args.lora, ema=args.ema)
    what = "LoRA weights (FluxPipeline.load_lora_weights)" if args.lora else \
        "transformer folder (FluxTransformer2DModel.from_pretrained)"
    print(f"wrote {what} to {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune with a reward-gradient method")
    t.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults apply without one")
    t.add_argument("--resume", default=None, help="checkpoint to resume from")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 method.params.alpha=0.1")
    s = sub.add_parser("sample", help="sample images from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", action="append", required=True, help="may be repeated")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's T)")
    s.add_argument("--ema", action="store_true", help="sample with the EMA weights")
    s.add_argument("--out", default="samples.png")
    v = sub.add_parser("eval", help="sample the eval prompts and score them with every configured reward "
                                     "(and the world's judge): a table and a grid")
    v.add_argument("--checkpoint", default=None, help="a run's checkpoint (EMA weights unless --no-ema)")
    v.add_argument("--config", default=None, help="or a config: evaluates its untrained base model")
    v.add_argument("--n", type=int, default=0, help="eval prompts (default: the config's eval_size)")
    v.add_argument("--seed", type=int, default=1234)
    v.add_argument("--no-ema", action="store_true", help="evaluate the raw weights")
    v.add_argument("--out", default="eval", help="output folder (eval.md, eval.json, eval_grid.png)")
    v.add_argument("overrides", nargs="*", help="key=value overrides of the run's config, e.g. judge=true")
    e = sub.add_parser("export", help="export a checkpoint's transformer in diffusers' formats")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--lora", action="store_true",
                   help="write only the LoRA adapter (for FluxPipeline.load_lora_weights); default: a full "
                        "transformer folder, LoRA fused in")
    e.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = ap.parse_args(argv)
    return {"train": _train, "sample": _sample, "eval": _eval, "export": _export}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
