"""LeapTrainer: the training loop around an estimator from ``engine.methods``.

AdamW, gradient clipping, an fp32 EMA, full fine-tuning or LoRA (peft), bf16 autocast on GPU,
atomic safetensors checkpoints with exact resume, per-step metrics as JSONL (and TensorBoard),
gradient accumulation and data parallel training under torchrun (DDP / FSDP2,
``engine.distributed``).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import resource
import time
import warnings
from pathlib import Path

import torch
import yaml

from engine import build, distributed, generate
from engine import checkpoint as ckpt
from engine.config import TrainConfig, from_dict, to_dict
from engine.flux.adapter import FluxAdapter
from engine.methods import method_from_config
from engine.report import plot_reward_curve, save_grid
from engine.rundir import RunDir
from engine.schedule import flux_sigmas

DTYPES = build.DTYPES


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS (Linux: KiB)


class LeapTrainer:
    """Fine-tunes a Flux transformer with a reward-gradient method (LeapAlign by default).

    ``LeapTrainer(cfg)`` builds everything from the config through ``engine.build``, in the order
    documented there; ``adapter``, ``text_encoder`` and ``reward`` may be passed in to train
    other models with the same loop.
    """

    def __init__(self, cfg: TrainConfig, adapter: FluxAdapter | None = None, text_encoder=None, reward=None):
        self.cfg = cfg = cfg.validate()
        m = cfg.model
        self.device = build.resolve_device(cfg.device)
        self.dist = distributed.setup(cfg.distributed, self.device, timeout_s=cfg.distributed_timeout_s)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if adapter is None:
            adapter = build.build_model(m, self.device)       # checks the image size
        else:
            build.check_image_size(adapter, m.height, m.width)
        self.adapter = adapter
        self.prompts, self.test_prompts = build.build_prompts(cfg)
        self.eval_set = build.eval_prompts(cfg, self.prompts, self.test_prompts)
        self.text_encoder = text_encoder or build.build_text_encoder(cfg, adapter, self.device,
                                                                     self.prompts + self.eval_set, self.dist)
        built, self.eval_rewards = build.build_rewards(cfg, self.device, training=reward is None)
        self.reward_model = (reward if reward is not None else built).requires_grad_(False).eval().to(self.device)
        build.check_prompts(self.prompts + self.eval_set, self.text_encoder, self.reward_model,
                            *self.eval_rewards.values())
        self.method = method_from_config(cfg.method)

        self.transformer = adapter.transformer
        build.apply_decoder_checkpointing(adapter, m)
        build.apply_lora(self.transformer, cfg.lora, cfg.seed)
        build.apply_fp8_base(self.transformer, build.FP8_BASE_MODES[m.base_precision], self.device)
        self.swap = build.apply_block_swap(self.transformer, m.swap_blocks, self.device)
        self.transformer.train()
        text_tokens = self.text_encoder.encode(self.prompts[:1])[0].shape[1] if m.policy == "budget" else 0
        self.policy = build.apply_policy(self.transformer, m, cfg.batch_size, text_tokens, adapter)
        build.apply_compile(self.transformer, m.compile)
        self.model = build.apply_parallel(self.transformer, self.dist, self.device)
        if self.model is not self.transformer:
            # a shallow copy whose forwards go through the DDP wrapper; sampling keeps the plain one
            self._train_adapter = copy.copy(adapter)
            self._train_adapter.transformer = self.model
        else:
            self._train_adapter = adapter
        self.params = build.trainable_parameters(self.transformer)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, weight_decay=o.weight_decay)
        self.ema = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.skipped = 0
        self.sigmas = flux_sigmas(cfg.num_steps, adapter.image_seq_len(m.height, m.width))
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> str:
        """What will run: device, method, trainable size, parallelism, block policy, backends."""
        cfg, d = self.cfg, self.dist
        return (f"device: {self.device}; method: {cfg.method.name} {self.method}; trainable parameters: "
                f"{sum(p.numel() for p in self.params.values()):,}"
                f"{f' (LoRA r{cfg.lora.rank})' if cfg.lora.enabled else ''}; {d.world} process(es) "
                f"({cfg.distributed}), global batch {self.global_batch} = {cfg.batch_size} x {cfg.grad_accum} "
                f"micro-steps x {d.world}"
                + (f"; block swap: the last {len(self.swap.leaves)} blocks' frozen linears in host memory "
                   f"({self.swap.swapped_bytes() / 2**30:.2f} GiB)" if self.swap else "")
                + f"\n{build.describe_backends(self.device, cfg.model.policy, self.policy)}")

    # ------------------------------------------------------------------ pieces
    def autocast(self):
        return generate.autocast(self.device)

    EMBED_CACHE = 1024   # prompts whose embeddings are kept (on the CPU; T5's are ~4 MB each)

    def condition(self, prompts: list[str]):
        """Prompt embeddings, computed once per prompt and kept (the encoders never train)."""
        for p in dict.fromkeys(prompts):      # mark this batch's hits as most recent
            if p in self._embeds:
                self._embeds[p] = self._embeds.pop(p)
        todo = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if todo:
            pe, pooled = self.text_encoder.encode(todo)
            for i, p in enumerate(todo):
                self._embeds[p] = (pe[i].detach().cpu(), pooled[i].detach().cpu())
            while len(self._embeds) > max(self.EMBED_CACHE, len(prompts)):
                self._embeds.pop(next(iter(self._embeds)))   # oldest first
        pe = torch.stack([self._embeds[p][0] for p in prompts])
        pooled = torch.stack([self._embeds[p][1] for p in prompts])
        return self.adapter.condition(pe, pooled, self.cfg.model.height, self.cfg.model.width)

    def reward_fn(self, prompts: list[str]):
        H, W = self.cfg.model.height, self.cfg.model.width

        def r(x0: torch.Tensor) -> torch.Tensor:
            return self.reward_model(self.adapter.decode(x0, H, W), prompts)

        return r

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        """One training iteration (one update); returns its metrics, over the global batch.

        The global batch (batch_size * grad_accum * world_size samples: prompts, noise and the
        method's draws) comes whole from the run generator on every rank; each rank's micro-steps
        take consecutive slices of it, and each micro-loss (a mean over its slice) is divided by
        grad_accum, so that with DDP / FSDP averaging over ranks the update is that of the mean
        over the global batch, however it is split. A non-finite reward, loss or gradient on any
        rank skips the update on all (counted in ``skipped``), leaving weights and optimizer as
        they were."""
        cfg, d = self.cfg, self.dist
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        B, A = cfg.batch_size, cfg.grad_accum
        G = B * A * d.world
        idx = torch.randint(len(self.prompts), (G,), generator=self.generator).tolist()
        x1_all = self.adapter.noise(G, cfg.model.height, cfg.model.width, generator=self.generator,
                                    device=self.device)
        choices_all = self.method.draw(cfg.num_steps, self.generator, x1_all)
        losses, rewards, per_sample, shared, calls, bad = [], [], {}, {}, 0, None
        for m in range(A):
            piece = d.rank * A + m
            sl = slice(piece * B, (piece + 1) * B)
            prompts = [self.prompts[i] for i in idx[sl]]
            cond = self.condition(prompts)
            choices = distributed.take(choices_all, x1_all.shape, sl)
            with d.accumulating(self.model, last=m == A - 1):
                with self.autocast():
                    out = self.method.loss(self._train_adapter.velocity_fn(cond), self.reward_fn(prompts),
                                           x1_all[sl], self.sigmas, **choices)
                loss_val, reward_val = float(out.loss.detach()), out.reward.float().cpu()
                losses.append(loss_val)
                rewards.append(reward_val)
                # the share of samples the clip guard has stopped pushing: relu(lam - r) is 0 there
                per_sample.setdefault("past_lam", []).append((reward_val >= self.method.lam).float())
                calls += out.model_calls
                for key, val in out.metrics.items():
                    if torch.is_tensor(val):
                        per_sample.setdefault(key, []).append(val.detach().float().flatten().cpu())
                    else:
                        shared.setdefault(key, val)
                bad = self._nonfinite(loss_val, reward_val)
                if bad is not None:
                    break
                (out.loss / A if A > 1 else out.loss).backward()
        metrics = {"step": self.step_count + 1, **self._reduce(losses, rewards, per_sample)}
        if bad is None:
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
            gn = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
            gn = float(gn.full_tensor() if distributed.is_dtensor(gn) else gn)   # FSDP2: the global norm
            metrics["grad_norm"] = gn
            if not math.isfinite(gn):
                bad = f"non-finite gradient norm {gn}"
            elif min(gn, clip) > self.MAX_UPDATE_NORM:
                bad = f"gradient norm {gn:.3g} would overflow AdamW's state (set optim.grad_clip)"
        if bad is None:
            self._update()
        else:
            self.skipped += 1
            if d.main:
                warnings.warn(f"step {self.step_count + 1} skipped, no update applied: {bad}")
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        for key, val in out.metrics.items():
            metrics[key] = metrics.pop(key) if key in per_sample else shared[key]
        step_time, peak = d.all_reduce([time.perf_counter() - t0, _peak_memory_bytes(self.device)], "max")
        metrics.update(skipped_step=bad is not None, skipped_total=self.skipped, model_calls=calls,
                       step_time_s=step_time, peak_mem_bytes=int(peak))
        return metrics

    # the post-clip gradient norm above which AdamW's second moment (g^2, in at most float32
    # range) could overflow; with lr <= 1 and lr * weight_decay <= 1 (config checks) that is the
    # one way a finite gradient can make the state non-finite, so such a step is skipped whole
    MAX_UPDATE_NORM = 1e18

    def _update(self) -> None:
        """AdamW's step, then a check that weights and optimizer state are finite (on every rank).
        ``step`` has already skipped every update that could overflow them, so a failure here is
        a bug or a hardware fault: the run stops before anything is saved, and the last
        checkpoint stays the last good state."""
        self.optimizer.step()
        tensors = [*self.params.values(), *(v for st in self.optimizer.state.values() for v in st.values()
                                            if torch.is_tensor(v) and v.is_floating_point())]
        local = [t.to_local() if distributed.is_dtensor(t) else t for t in tensors]   # FSDP2: this rank's shard
        bad = not bool(torch.stack([torch.isfinite(t).all() for t in local]).all())   # one device sync
        if self.dist.active:
            bad = bool(self.dist.all_reduce([float(bad)], "max")[0])
        if bad:
            raise RuntimeError(f"step {self.step_count + 1}: the update made weights or optimizer state non-finite; "
                               f"stopped without saving (the last checkpoint is the last good state)")
        self._ema_update()

    def _nonfinite(self, loss_val: float, reward_val: torch.Tensor) -> str | None:
        """Why this micro-step must not update, on this rank or any other (all ranks agree)."""
        here = not math.isfinite(loss_val) or not torch.isfinite(reward_val).all()
        why = f"non-finite loss {loss_val} or reward {reward_val.tolist()}" if here else None
        if self.dist.active:
            flags = [0.0] * self.dist.world
            flags[self.dist.rank] = float(here)
            ranks = [r for r, f in enumerate(self.dist.all_reduce(flags)) if f]
            if ranks:
                why = f"{why or 'non-finite loss or reward'} (rank(s) {ranks})"
        return why

    def _reduce(self, losses: list[float], rewards: list[torch.Tensor], per_sample: dict) -> dict:
        """Means over every sample of the global batch that was run (all of it unless skipped)."""
        parts = {"loss": (sum(losses), len(losses))}
        for key, vals in {"reward": rewards, **per_sample}.items():
            v = torch.cat(vals)
            parts[key] = (v.sum(), v.numel()) if self.dist.active else (float(v.mean()), 1)
        flat = self.dist.all_reduce([float(x) for pair in parts.values() for x in pair])
        return {key: flat[2 * i] / flat[2 * i + 1] for i, key in enumerate(parts)}

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = self.cfg.optim.ema_decay
        for n, p in self.params.items():
            self.ema[n].lerp_(p.detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights in (for sampling / evaluation)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int = 1234, num_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] and their rewards, from fixed noise (comparable across
        calls), with ``num_steps`` (default: the evaluation's T, ``eval_num_steps``)."""
        m = self.cfg.model
        images = generate.generate(self.adapter, self.condition, prompts, m.height, m.width,
                                   num_steps or self.cfg.eval_num_steps, seed)
        with self.autocast():
            return images, self.reward_model(images, prompts).float()

    @torch.no_grad()
    def evaluate(self, prompts: list[str] | None = None, seed: int = 1234, ema: bool = False,
                 batch: int = 64) -> tuple[dict, torch.Tensor]:
        """Sample ``prompts`` (the fixed eval set by default) from fixed noise with T =
        ``eval_num_steps`` and score them with the training reward, every ``eval_rewards`` entry
        and, with ``judge``, the world's judge. -> (metrics, images); images in [0, 1] on the CPU."""
        m = self.cfg.model
        prompts = self.eval_set if prompts is None else list(prompts)
        with self.ema_weights() if ema else contextlib.nullcontext():
            return generate.evaluate(self.adapter, self.condition, {"reward": self.reward_model, **self.eval_rewards},
                                     prompts, m.height, m.width, self.cfg.eval_num_steps, seed, self.cfg.judge, batch)

    # ------------------------------------------------------------------ checkpoints
    def _model_config(self) -> dict:
        return dict(self.transformer.config)

    def _shapes(self) -> dict[str, list[int]]:
        return {n: list(p.shape) for n, p in self.params.items()}

    def save_checkpoint(self, path: str | Path) -> None:
        """Full, unsharded tensors in one file (layout: ``engine.checkpoint``), written by rank 0;
        under FSDP every rank must call it (the shards are gathered one tensor at a time)."""
        tensors = ckpt.state_tensors(self.params, self.ema, self.optimizer, self.dist.full)
        if not self.dist.main:
            return
        tensors["rng.generator"] = self.generator.get_state()
        config = ckpt.portable_config(self._model_config())
        meta = {"step": str(self.step_count), "skipped": str(self.skipped), "global_batch": str(self.global_batch),
                "model_config": json.dumps(config, sort_keys=True),
                "shapes": json.dumps(self._shapes()), "config": yaml.safe_dump(to_dict(self.cfg)),
                "prompts_sha256": self._prompts_digest()}
        ckpt.save_atomic(path, tensors, meta)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, EMA, optimizer, RNG and step; the whole file is validated
        (``engine.checkpoint.read_state``) before anything changes."""
        state = ckpt.read_state(path, self._model_config(), self._shapes())
        ckpt.apply_state(state, self.params, self.ema, self.optimizer, self.generator, self.dist.shard_like)
        self.step_count, self.skipped = state.step, state.skipped
        if state.global_batch not in (None, self.global_batch) and self.dist.main:
            warnings.warn(f"checkpoint {path} was trained with a global batch of {state.global_batch} "
                          f"(batch_size * grad_accum * world_size), this run has {self.global_batch}: "
                          f"it continues, but not as the original run would have")
        if state.prompts_sha256 not in (None, self._prompts_digest()):
            warnings.warn(f"checkpoint {path} was trained on another prompt list (prompt_file changed?); "
                          f"resuming on the current one")

    @property
    def global_batch(self) -> int:
        """Samples averaged into one update: batch_size * grad_accum * world_size."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    def _prompts_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.prompts).encode("utf-8")).hexdigest()

    @staticmethod
    def config_from_checkpoint(path: str | Path) -> TrainConfig:
        """The run config a checkpoint was trained with, for ``--resume`` (the user's own run);
        ``engine.checkpoint.read_config`` is the path-free view for sample / eval / export."""
        return from_dict(ckpt.stored_config(path))

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None, resume: str | Path | None = None) -> dict:
        """Run to ``steps`` total steps (cfg.steps by default), logging and checkpointing into
        cfg.output_dir (locked for this run); returns a summary with evaluations before and after."""
        cfg, main = self.cfg, self.dist.main
        if cfg.tensorboard:   # on every rank, before any work: a missing package ends the whole job now
            from engine.tb import TBLogger, require

            require()
        out = Path(cfg.output_dir)
        ck = out / "checkpoint.safetensors"
        with RunDir(out, enabled=main) as run:
            if resume is not None:
                self.load_checkpoint(resume)
            if main:
                ckpt.remove_stale_temps(ck)
                run.start_metrics(self.step_count if resume is not None else None)
            return self._run(steps if steps is not None else cfg.steps, run, ck)

    def _run(self, total: int, run: RunDir, ck: Path) -> dict:
        from tqdm import tqdm

        cfg, main, out = self.cfg, self.dist.main, run.path
        summary = {}
        board = None
        if cfg.tensorboard and main:
            from engine.tb import TBLogger

            board = TBLogger(out / "tb")
        try:
            # every rank samples the evaluations (under FSDP every forward needs all of them);
            # only rank 0 writes anything
            if self.step_count == 0:
                before, images = self.evaluate()
                if main:
                    save_grid(images[: cfg.samples], out / "samples_before.png",
                              captions=generate.captions(images, self.eval_set[: cfg.samples], cfg.judge))
                    if board:
                        board.scalars("eval", before, 0)
                        board.images("samples/before", images[: cfg.samples], 0)
                summary["eval_before"] = before
                summary["eval_reward_before"] = before["reward"]
            with tqdm(total=total, initial=self.step_count, desc="train", dynamic_ncols=True, disable=not main) as bar:
                while self.step_count < total:
                    m = self.step()
                    if main:
                        run.log(m)
                        if board:
                            board.scalars("train", m, self.step_count)
                    bar.set_postfix(reward=f"{m['reward']:.4f}", loss=f"{m['loss']:.4f}")
                    bar.update(1)
                    if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0:
                        self.save_checkpoint(ck)
            self.save_checkpoint(ck)
            after, images = self.evaluate()
            after_ema, _ = self.evaluate(ema=True)
            summary.update(eval_after=after, eval_after_ema=after_ema, eval_reward_after=after["reward"],
                           eval_reward_after_ema=after_ema["reward"])
            summary.update(steps=self.step_count, skipped=self.skipped, output_dir=str(out))
            if main:
                save_grid(images[: cfg.samples], out / "samples_after.png",
                          captions=generate.captions(images, self.eval_set[: cfg.samples], cfg.judge))
                if board:
                    board.scalars("eval", after, self.step_count)
                    board.scalars("eval_ema", after_ema, self.step_count)
                    board.images("samples/after", images[: cfg.samples], self.step_count)
                plot_reward_curve(run.metrics, out / "reward_curve.png")
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            if board is not None:
                board.close()
        self.dist.barrier()   # the run's files are all written when any rank returns
        return summary
