"""python -m engine {train, sample, eval, export, plan}

A user error (a bad config value, a missing file, a refused checkpoint) prints one line and
exits 2; ``--debug`` shows the traceback. Configs are checked before the heavy imports.
"""
from __future__ import annotations

import argparse
import json
import sys

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, RuntimeError)


def _cpu_settings(device) -> None:
    # The world's black backgrounds drive activations into denormals, which slow CPU float math
    # several-fold; flushing them changes nothing a float32 result can resolve. A process-wide
    # switch, so it is set here, by the application, not by the library.
    if device.type == "cpu":
        import torch

        torch.set_flush_denormal(True)


def _train(args) -> int:
    from pathlib import Path

    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)   # light: fails before torch is imported
    if args.resume is not None and not Path(args.resume).is_file():
        raise FileNotFoundError(f"checkpoint to resume not found: {args.resume}")
    from engine.trainer import LeapTrainer

    trainer = LeapTrainer(cfg)   # under torchrun (distributed=ddp|fsdp) this joins the job
    try:
        _cpu_settings(trainer.device)
        if trainer.dist.main:
            print(trainer.describe(), flush=True)
        summary = trainer.train(resume=args.resume)
        if trainer.dist.main:
            from engine.report import format_summary

            print(format_summary(summary))
    finally:
        trainer.dist.close()
    return 0


def _load_run(args, need):
    """(config, model with the checkpoint's weights, text encoder, device) for sample / eval."""
    from engine import build
    from engine import checkpoint as ckpt

    cfg, withheld = ckpt.read_config(args.checkpoint, args.overrides, need=need)
    device = build.resolve_device(cfg.device)
    _cpu_settings(device)
    adapter = build.build_trainable(cfg, device)
    meta = ckpt.load_weights(args.checkpoint, adapter.transformer, ema=not args.raw)
    text = build.source(cfg.model.source).text(cfg.model, adapter, device, build.DTYPES[cfg.model.dtype])
    return cfg, withheld, adapter, text, device, int(meta.get("step", 0))


def _sample(args) -> int:
    from pathlib import Path

    from engine import build, generate
    from engine.report import save_grid

    cfg, withheld, adapter, text, device, step = _load_run(args, need=("model",))
    prompts = [p for p in args.prompt for _ in range(args.n)]
    build.check_prompts(prompts, text)
    m = cfg.model
    images = generate.generate(adapter, generate.text_condition(adapter, text, m.height, m.width), prompts,
                               m.height, m.width, args.steps or cfg.eval_num_steps, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images, out / "samples.png", captions=prompts)
    rows = [{"prompt": p} for p in prompts]
    if any(k.startswith("reward.") for k in withheld):
        print(f"reward ({cfg.reward.name}) not computed: its weights path is not read from a checkpoint; "
              f"pass reward.params.path=... to score")
    else:
        reward, _ = build.build_rewards(cfg, device)
        build.check_prompts(prompts, reward)
        with generate.autocast(device):
            scores = reward(images, prompts).float().tolist()
        for row, r in zip(rows, scores):
            row[f"reward_{cfg.reward.name}"] = r
            print(f"reward ({cfg.reward.name}) {r:.4f}  {row['prompt']}")
    (out / "samples.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "step": step,
                                                  "weights": "raw" if args.raw else "EMA",
                                                  "num_steps": args.steps or cfg.eval_num_steps,
                                                  "seed": args.seed, "samples": rows}, indent=2))
    print(f"wrote {out / 'samples.png'} and {out / 'samples.json'} ({'raw' if args.raw else 'EMA'} weights, "
          f"step {step})")
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from engine import build, generate
    from engine.report import save_grid, write_eval_table

    if (args.checkpoint is None) == (args.config is None):
        raise ValueError("eval needs exactly one of --checkpoint (a trained run) or --config (the base model)")
    if args.n:
        args.overrides = [*args.overrides, f"eval_size={args.n}"]
    if args.checkpoint:
        cfg, _, adapter, text, device, step = _load_run(args, need=("model", "prompts", "rewards"))
    else:
        from engine.config import load_config

        cfg = load_config(args.config, args.overrides)
        cfg.model.base_precision = "bf16"   # the base is evaluated as loaded (fp8 storage is for LoRA runs)
        device = build.resolve_device(cfg.device)
        _cpu_settings(device)
        adapter = build.build_model(cfg.model, device)
        text = build.source(cfg.model.source).text(cfg.model, adapter, device, build.DTYPES[cfg.model.dtype])
        step = 0
    train, test = build.build_prompts(cfg)
    prompts = build.eval_prompts(cfg, train, test)
    reward, extra = build.build_rewards(cfg, device)
    build.check_prompts(prompts, text, reward, *extra.values())
    m = cfg.model
    metrics, images = generate.evaluate(adapter, generate.text_condition(adapter, text, m.height, m.width),
                                        {"reward": reward, **extra}, prompts, m.height, m.width,
                                        cfg.eval_num_steps, args.seed, cfg.judge)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(images[: cfg.samples], out / "eval_grid.png",
              captions=generate.captions(images, prompts[: cfg.samples], cfg.judge))
    weights = ("raw" if args.raw else "EMA") if args.checkpoint else "base"
    what = f"{args.checkpoint or args.config} ({weights} weights, step {step})"
    write_eval_table(metrics, out / "eval.md", what)
    (out / "eval.json").write_text(json.dumps({"source": what, **metrics}, indent=2))
    print((out / "eval.md").read_text())
    return 0


def _export(args) -> int:
    from engine.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, lora=args.lora, ema=args.ema, overrides=args.overrides)
    what = "LoRA weights (FluxPipeline.load_lora_weights)" if args.lora else \
        "transformer folder (FluxTransformer2DModel.from_pretrained)"
    print(f"wrote {what} to {out}")
    return 0


def _plan(args) -> int:
    from engine.config import load_config

    if args.budget_gib is not None and not args.budget_gib > 0:
        raise ValueError(f"--budget-gib must be > 0, got {args.budget_gib}")
    cfg = load_config(args.config, args.overrides)   # light: fails before torch is imported
    from engine.plan import format_plan, run_plan

    log = (lambda s: print(f"  .. {s}", file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    r = run_plan(cfg, model_config=args.model_config, budget_gib=args.budget_gib, device=args.device, log=log,
                 verify=args.verify, world_size=args.world_size)
    print(format_plan(r))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    if args.budget_gib is not None and r["choice"] is None:
        s = r["smallest"]
        from engine.plan import gib, overrides_line

        what = s.get("what") or overrides_line(s["overrides"])
        print(f"error: nothing fits {args.budget_gib:g} GiB; the least it takes is {gib(s['peak'])} ({what})",
              file=sys.stderr)
        return 2
    return 0


def _config_help() -> str:
    from engine.config import SECTIONS, TrainConfig
    import dataclasses

    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS]
    lines = ["config keys (YAML, or key=value overrides; nested with dots, e.g. optim.lr=1e-5):"]
    for name, cls in SECTIONS.items():
        lines.append(f"  {name}.{{{', '.join(f.name for f in dataclasses.fields(cls))}}}")
    lines.append(f"  {', '.join(top)}")
    lines.append("documented in engine/config.py (run settings) and engine/params.py (each method's and "
                 "reward's parameters); method.<name>.<param> sets a method's own parameters, e.g. "
                 "method.leapalign.alpha=0.1")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune with a reward-gradient method", epilog=_config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults apply without one")
    t.add_argument("--resume", default=None, help="checkpoint to resume from")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=10 method.leapalign.alpha=0.1")
    s = sub.add_parser("sample", help="sample images from a checkpoint (EMA weights unless --raw)")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--prompt", action="append", required=True, help="may be repeated")
    s.add_argument("--n", type=int, default=1, help="images per prompt")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's eval_num_steps)")
    s.add_argument("--ema", action="store_true", help=argparse.SUPPRESS)   # the default; kept for old commands
    s.add_argument("--raw", action="store_true", help="sample with the raw weights instead of the EMA")
    s.add_argument("--out", default="samples", help="output folder (samples.png with captions, samples.json)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. model.source=PATH for a folder model "
                                                "(paths stored in a checkpoint are not read)")
    v = sub.add_parser("eval", help="sample the eval prompts and score them with every configured reward "
                                     "(and the world's judge): a table and a grid")
    v.add_argument("--checkpoint", default=None, help="a run's checkpoint (EMA weights unless --raw)")
    v.add_argument("--config", default=None, help="or a config: evaluates its untrained base model")
    v.add_argument("--n", type=int, default=0, help="eval prompts (default: the run's eval_size)")
    v.add_argument("--seed", type=int, default=1234)
    v.add_argument("--raw", "--no-ema", dest="raw", action="store_true", help="evaluate the raw weights")
    v.add_argument("--out", default="eval", help="output folder (eval.md, eval.json, eval_grid.png)")
    v.add_argument("overrides", nargs="*", help="key=value overrides of the run's config, e.g. judge=true")
    e = sub.add_parser("export", help="export a checkpoint's transformer in diffusers' formats")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True, help="output folder (replaced whole if it exists)")
    e.add_argument("--lora", action="store_true",
                   help="write only the LoRA adapter (for FluxPipeline.load_lora_weights); default: a full "
                        "transformer folder, LoRA fused in")
    e.add_argument("--ema", action="store_true", help="export the EMA weights")
    e.add_argument("overrides", nargs="*", help="key=value, e.g. model.source=PATH for a folder model")
    p = sub.add_parser("plan", help="size one training iteration's GPU memory on a CPU (fake tensors, no weights "
                                    "read); with --budget-gib, the fastest settings that fit")
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("--model-config", default=None, choices=("flux-dev",),
                   help="size this published architecture instead of reading model.source's folder")
    p.add_argument("--budget-gib", type=float, default=None, help="GPU memory to fit, in GiB")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"),
                   help="the device the run will train on (default: the config's; cuda for device=auto)")
    p.add_argument("--verify", action="store_true",
                   help="with --budget-gib: also measure the chosen setting's whole iteration (about a minute more)")
    p.add_argument("--world-size", type=int, default=1,
                   help="with distributed=fsdp: plan one GPU of this many (FSDP2 shards weights, optimizer "
                        "state, EMA and gradients over them)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.height=1024 model.width=1024")
    args = ap.parse_args(argv)
    if args.cmd == "sample" and args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    try:
        return {"train": _train, "sample": _sample, "eval": _eval, "export": _export,
                "plan": _plan}[args.cmd](args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
