"""LeapTrainer: the training loop around an estimator from ``engine.methods``.

AdamW, gradient clipping, an fp32 EMA, full fine-tuning or LoRA (peft), bf16 autocast on GPU,
atomic safetensors checkpoints with exact resume, per-step metrics as JSONL (and TensorBoard),
gradient accumulation and data parallel training under torchrun (DDP / FSDP2,
``engine.distributed``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import resource
import time
import warnings
from pathlib import Path

import torch
import yaml

from engine import checkpoint as ckpt
from engine import distributed
from engine.config import TrainConfig, from_dict, to_dict
from engine.flux.adapter import FluxAdapter
from engine.flux.embed_cache import CachedTextEncoder, encoder_identity, pipeline_encoder_id
from engine.flux.lean import apply_policy, block_inputs
from engine.flux.text import PipelineTextEncoder
from engine.flux.tiny import HashTextEncoder, build_tiny_flux
from engine.methods import make_method
from engine.prompts import load_prompt_split
from engine.report import plot_reward_curve, save_grid
from engine.rewards import build_reward
from engine.schedule import flux_sigmas

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS (Linux: KiB)


class LeapTrainer:
    """Fine-tunes a Flux transformer with a reward-gradient method (LeapAlign by default).

    ``LeapTrainer(cfg)`` builds everything from the config; ``adapter``, ``text_encoder`` and
    ``reward`` may be passed in to train other models with the same loop.
    """

    def __init__(self, cfg: TrainConfig, adapter: FluxAdapter | None = None, text_encoder=None, reward=None):
        self.cfg = cfg.validate()
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            if cfg.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("device=cuda was asked for, but torch sees no CUDA device")
            self.device = torch.device(cfg.device)
        self.dist = distributed.setup(cfg.distributed, self.device)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        dtype = DTYPES[cfg.model.dtype]
        m = cfg.model
        if adapter is None:
            if m.source == "tiny":
                adapter = build_tiny_flux(m.seed, dtype, self.device, m.guidance_scale)
            elif m.source == "world":
                from engine.world.model import load_world_flux

                adapter = load_world_flux(self.device, dtype, m.guidance_scale)
            else:
                adapter = FluxAdapter.from_pretrained(m.source, dtype, self.device, m.guidance_scale,
                                                      transformer_file=m.transformer_file or None)
        self.adapter = adapter
        # training prompts and the held-out ones (prompt_file, when set, replaces cfg.prompts)
        if cfg.prompt_file == "world":
            from engine.world.prompts import split

            world = split()
            self.prompts, self.test_prompts = list(world.train), list(world.test)
        elif cfg.prompt_file:
            self.prompts, self.test_prompts = load_prompt_split(cfg.prompt_file, cfg.test_fraction, cfg.seed)
        else:
            self.prompts, self.test_prompts = list(cfg.prompts), []
        encoder_id = None
        if text_encoder is None:
            tc = adapter.transformer.config
            if m.source == "tiny":
                text_encoder = HashTextEncoder(tc.joint_attention_dim, tc.pooled_projection_dim, seed=m.seed)
            elif m.source == "world":
                from engine.world.text import MiniLMTextEncoder

                text_encoder = MiniLMTextEncoder(device=self.device)
            elif cfg.embed_cache_dir:   # built only on a cache miss, dropped after the precompute
                text_encoder = functools.partial(PipelineTextEncoder, m.source, dtype, self.device)
                encoder_id = pipeline_encoder_id(m.source, 512, dtype)
            else:
                text_encoder = PipelineTextEncoder(m.source, dtype, self.device)
        if cfg.embed_cache_dir:
            text_encoder = CachedTextEncoder(text_encoder, cfg.embed_cache_dir,
                                             encoder_id or encoder_identity(text_encoder))
            with self.dist.main_first():   # the other ranks then only read the files rank 0 wrote
                text_encoder.precompute(self.prompts + self.eval_prompts(), progress=self.dist.main)
            text_encoder.release()
        self.text_encoder = text_encoder
        reward = reward if reward is not None else build_reward(cfg.reward.name, **cfg.reward.params)
        self.reward_model = reward.requires_grad_(False).eval().to(self.device)
        self.eval_rewards = {f"reward_{r['name']}": build_reward(r["name"], **r.get("params", {})).to(self.device)
                             for r in cfg.eval_rewards}
        if m.checkpoint_reward and adapter.vae is not None:
            # Exact recomputation of the frozen decoder (engine/flux/vae.py): at 1024^2 on Flux's
            # VAE the decode + reward backward peaks at 2.36 GiB ("auto") against 6.09 GiB with
            # diffusers' per-block checkpointing and 11.37 GiB plain, for ~0.7 extra decoder
            # forwards. One checkpoint around decode + reward would rebuild the whole graph in
            # backward and leave the peak where it was.
            if m.reward_ckpt == "diffusers":
                adapter.vae.enable_gradient_checkpointing()
            else:
                from engine.flux.vae import checkpoint_decoder

                checkpoint_decoder(adapter.vae, m.reward_ckpt)
        self.method = make_method(cfg.method.name, **cfg.method.params)

        self.transformer = adapter.transformer
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            self.transformer.requires_grad_(False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)   # LoRA init from the run seed, not the global RNG
                self.transformer.add_adapter(PeftLoraConfig(
                    r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(cfg.lora.targets)))
        else:
            self.transformer.requires_grad_(True)
        self.transformer.train()
        self.policy = self._apply_policy()
        if m.compile:
            # after the policy swap, so the lean / checkpointed forwards are what gets compiled;
            # the Triton and CUDA ops are custom ops with fake kernels, so dynamo traces through them
            self.transformer.compile_repeated_blocks(backend=m.compile, dynamic=False)
        # FSDP2 swaps the parameters for sharded DTensors in place, so params, the optimizer and
        # the EMA are made after it (and the EMA is sharded like its parameter)
        self.model = self.dist.wrap(self.transformer, self.device)
        if self.model is not self.transformer:
            # a shallow copy whose forwards go through the DDP wrapper; sampling keeps the plain one
            self._train_adapter = copy.copy(adapter)
            self._train_adapter.transformer = self.model
        else:
            self._train_adapter = adapter
        self.params = {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("no trainable parameters (check lora.targets)")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, weight_decay=o.weight_decay)
        self.ema = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self.skipped = 0
        H, W = cfg.model.height, cfg.model.width
        self.sigmas = flux_sigmas(cfg.num_steps, adapter.image_seq_len(H, W))
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ pieces
    def _apply_policy(self) -> dict:
        m = self.cfg.model
        kw = {}
        if m.policy == "budget":
            h, w = self.adapter.latent_size(m.height, m.width)
            txt = self.text_encoder.encode(self.prompts[:1])[0].shape[1]
            kw = dict(budget_bytes=int(m.budget_gib * 2**30),
                      inputs=block_inputs(self.transformer, self.cfg.batch_size, txt, (h // 2, w // 2)))
        return apply_policy(self.transformer, m.policy, **kw)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    EMBED_CACHE = 1024   # prompts whose embeddings are kept (on the CPU; T5's are ~4 MB each)

    def _condition(self, prompts: list[str]):
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
            cond = self._condition(prompts)
            choices = distributed.take(choices_all, x1_all.shape, sl)
            with d.accumulating(self.model, last=m == A - 1):
                with self._autocast():
                    out = self.method.loss(self._train_adapter.velocity_fn(cond), self.reward_fn(prompts),
                                           x1_all[sl], self.sigmas, **choices)
                loss_val, reward_val = float(out.loss.detach()), out.reward.float().cpu()
                losses.append(loss_val)
                rewards.append(reward_val)
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
            gn = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.optim.grad_clip)
            gn = float(gn.full_tensor() if distributed.is_dtensor(gn) else gn)   # FSDP2: the global norm
            metrics["grad_norm"] = gn
            if not math.isfinite(gn):
                bad = f"non-finite gradient norm {gn}"
        if bad is None:
            self.optimizer.step()
            self._ema_update()
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
        """Images (B, 3, H, W) in [0, 1] and their rewards, from fixed noise (comparable across calls)."""
        H, W = self.cfg.model.height, self.cfg.model.width
        T = num_steps or self.cfg.num_steps
        cond = self._condition(prompts)
        x = self.adapter.noise(len(prompts), H, W, generator=torch.Generator().manual_seed(seed), device=self.device)
        was_training = self.transformer.training
        self.transformer.eval()
        with self._autocast():
            x0 = self.adapter.rollout(x, flux_sigmas(T, self.adapter.image_seq_len(H, W)), cond)
            images = self.adapter.decode(x0.float(), H, W).float()
            rewards = self.reward_model(images, prompts).float()
        self.transformer.train(was_training)
        return images, rewards

    def eval_prompts(self) -> list[str]:
        """The fixed evaluation prompts: ``eval_size`` (else ``samples``) of the eval prompts, the
        test split or the training prompts, in that order of preference. A longer list is
        subsampled with a fixed seed (not the run's), so that every run scores the same set."""
        base = self.cfg.eval_prompts or self.test_prompts or self.prompts
        n = self.cfg.eval_size or self.cfg.samples
        if n < len(base):
            import random

            order = list(range(len(base)))
            random.Random(0).shuffle(order)
            base = [base[i] for i in sorted(order[:n])]
        return [base[i % len(base)] for i in range(n)]

    @torch.no_grad()
    def evaluate(self, prompts: list[str] | None = None, seed: int = 1234, ema: bool = False,
                 batch: int = 64) -> tuple[dict, torch.Tensor]:
        """Sample ``prompts`` (the eval prompts by default) from fixed noise and score them with the
        training reward, every ``eval_rewards`` entry and, with ``judge``, the world's judge.
        -> (metrics, images); images in [0, 1] on the CPU."""
        prompts = self.eval_prompts() if prompts is None else list(prompts)
        scorers = {"reward": self.reward_model, **self.eval_rewards}
        scores = {k: [] for k in scorers}
        images = []
        with self.ema_weights() if ema else contextlib.nullcontext():
            for i in range(0, len(prompts), batch):
                chunk = prompts[i:i + batch]
                img, r = self.sample(chunk, seed=seed + i)
                scores["reward"].append(r.cpu())
                for k, fn in scorers.items():
                    if k != "reward":
                        scores[k].append(fn(img, chunk).float().cpu())
                images.append(img.cpu())
        images = torch.cat(images)
        metrics = {k: float(torch.cat(v).mean()) for k, v in scores.items()}
        if self.cfg.judge:
            from engine.world.judge import by_kind, judge

            res = judge(images, prompts)
            metrics.update(judge=res.mean(), judge_accuracy=res.accuracy(), judge_by_kind=by_kind(res, prompts))
        metrics["n"] = len(prompts)
        return metrics, images

    # ------------------------------------------------------------------ checkpoints
    def _model_config(self) -> dict:
        return json.loads(json.dumps(dict(self.transformer.config), default=str))

    def _shapes(self) -> dict[str, list[int]]:
        return {n: list(p.shape) for n, p in self.params.items()}

    def save_checkpoint(self, path: str | Path) -> None:
        """Full, unsharded tensors in one file, written by rank 0; under FSDP every rank must call
        it (the shards are gathered one tensor at a time)."""
        tensors = {}
        full = self.dist.full
        for n, p in self.params.items():
            tensors[f"model.{n}"] = full(p)
            tensors[f"ema.{n}"] = full(self.ema[n])
        for n, p in self.params.items():   # every rank walks the same order (gathers are collective)
            for key, val in self.optimizer.state.get(p, {}).items():
                tensors[f"optim.{n}.{key}"] = full(val if torch.is_tensor(val) else torch.tensor(val))
        if not self.dist.main:
            return
        tensors["rng.generator"] = self.generator.get_state()
        meta = {"step": str(self.step_count), "skipped": str(self.skipped), "global_batch": str(self.global_batch),
                "fingerprint": ckpt.fingerprint(self._model_config(), self._shapes()),
                "model_config": json.dumps(self._model_config(), sort_keys=True),
                "shapes": json.dumps(self._shapes()), "config": yaml.safe_dump(to_dict(self.cfg)),
                "prompts_sha256": self._prompts_digest()}
        ckpt.save_atomic(path, tensors, meta)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, EMA, optimizer, RNG and step; validated in full before anything changes."""
        tensors, meta = ckpt.load(path, self._model_config(), self._shapes())
        if "rng.generator" not in tensors:
            raise ValueError(f"checkpoint {path} lacks the RNG state (rng.generator)")
        opt_state = {}
        for i, (n, p) in enumerate(self.params.items()):
            st = {key: tensors[f"optim.{n}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")
                  if f"optim.{n}.{key}" in tensors}
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st and st[key].shape != p.shape:
                    raise ValueError(f"checkpoint {path}: optim.{n}.{key} has shape {list(st[key].shape)}, "
                                     f"the weight has {list(p.shape)}")
            if st:
                opt_state[i] = {k: (v if k == "step" else self.dist.shard_like(v, p)) for k, v in st.items()}
        sd = self.optimizer.state_dict()
        sd["state"] = opt_state
        # everything is validated; from here on the state changes
        self.optimizer.load_state_dict(sd)
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.dist.shard_like(tensors[f"model.{n}"].to(p.dtype), p))
                self.ema[n].copy_(self.dist.shard_like(tensors[f"ema.{n}"], self.ema[n]))
        self.generator.set_state(tensors["rng.generator"])
        self.step_count, self.skipped = int(meta["step"]), int(meta["skipped"])
        if int(meta.get("global_batch", self.global_batch)) != self.global_batch and self.dist.main:
            warnings.warn(f"checkpoint {path} was trained with a global batch of {meta['global_batch']} "
                          f"(batch_size * grad_accum * world_size), this run has {self.global_batch}: "
                          f"it continues, but not as the original run would have")
        if meta.get("prompts_sha256", self._prompts_digest()) != self._prompts_digest():
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
        return from_dict(yaml.safe_load(ckpt.read_metadata(path)["config"]))

    # ------------------------------------------------------------------ the loop
    def train(self, steps: int | None = None, resume: str | Path | None = None) -> dict:
        """Run to ``steps`` total steps (cfg.steps by default), logging and checkpointing into
        cfg.output_dir; returns a summary with eval rewards before and after."""
        from tqdm import tqdm

        cfg, main = self.cfg, self.dist.main
        if cfg.tensorboard:   # on every rank, before any work: a missing package ends the whole job now
            from engine.tb import TBLogger, require

            require()
        out = Path(cfg.output_dir)
        if main:
            out.mkdir(parents=True, exist_ok=True)
        if resume is not None:
            self.load_checkpoint(resume)
        total = steps if steps is not None else cfg.steps
        summary = {}
        board = TBLogger(out / "tb") if cfg.tensorboard and main else None
        try:
            # every rank samples the evaluations (under FSDP every forward needs all of them);
            # only rank 0 writes anything
            if self.step_count == 0:
                before, images = self.evaluate()
                if main:
                    save_grid(images[: cfg.samples], out / "samples_before.png")
                    if board:
                        board.scalars("eval", before, 0)
                        board.images("samples/before", images[: cfg.samples], 0)
                summary["eval_before"] = before
                summary["eval_reward_before"] = before["reward"]
            log_path = out / "metrics.jsonl"
            with (open(log_path, "a") if main else contextlib.nullcontext()) as log, \
                    tqdm(total=total, initial=self.step_count, desc="train", dynamic_ncols=True, disable=not main) as bar:
                while self.step_count < total:
                    m = self.step()
                    if main:
                        log.write(json.dumps(m) + "\n")
                        log.flush()
                        if board:
                            board.scalars("train", m, self.step_count)
                    bar.set_postfix(reward=f"{m['reward']:.4f}", loss=f"{m['loss']:.4f}")
                    bar.update(1)
                    if cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0:
                        self.save_checkpoint(out / "checkpoint.safetensors")
            self.save_checkpoint(out / "checkpoint.safetensors")
            after, images = self.evaluate()
            after_ema, _ = self.evaluate(ema=True)
            summary.update(eval_after=after, eval_after_ema=after_ema, eval_reward_after=after["reward"],
                           eval_reward_after_ema=after_ema["reward"])
            summary.update(steps=self.step_count, skipped=self.skipped, output_dir=str(out))
            if main:
                save_grid(images[: cfg.samples], out / "samples_after.png")
                if board:
                    board.scalars("eval", after, self.step_count)
                    board.scalars("eval_ema", after_ema, self.step_count)
                    board.images("samples/after", images[: cfg.samples], self.step_count)
                plot_reward_curve(log_path, out / "reward_curve.png")
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            if board is not None:
                board.close()
        self.dist.barrier()   # the run's files are all written when any rank returns
        return summary
