"""Train the world's learned reward (engine/world/reward.py) on preference pairs from the renderer.

Data (all from the training split of the prompts; the judge is never consulted):
  a bank of groups, each one training prompt p with a true render of p and K renders of
  minimal edits of p (engine/world/pairs.py), the edited prompts' captions kept. Half of the
  images pass through the world VAE (encode -> decode) so that the reward holds on the blurrier,
  off-colour images a decoder produces, not only on crisp renders.
Loss per group (Bradley-Terry over K + 1 + M candidates, as a softmax):
  image side  for prompt p, the true render must outscore the K near misses and M true renders
              of other prompts of the batch;
  text side   for the true render, p must outscore the K edited prompts.
Online augmentation: Gaussian pixel noise and a random blur, applied to the whole group alike.
Validation: pairwise accuracy (true render above each near miss) on a bank built the same way
from the TEST prompts (held-out colour-shape pairs included). At the end, a diagnostic only:
the rank correlation between reward and judge on the pretrained world model's own samples.

Usage (the shipped weights; writes engine/world/weights/reward):
  python scripts/train_world_reward.py --steps 1200 --groups 4000 --vae-frac 0.35 --threads 1
The budget is in steps (not minutes) so that the weights do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.world import all_prompts, caption, parse, render, test_prompts, train_prompts  # noqa: E402
from engine.world.pairs import perturb  # noqa: E402
from engine.world.reward import REWARD_DIR, RewardNetConfig, WorldRewardNet, save_reward_net  # noqa: E402

LOG = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(line + "\n")


def build_bank(prompts: list[str], groups: int, k: int, seed: int):
    """-> images uint8 (G, 1 + K, 3, 64, 64), captions [G][1 + K] (index 0: the true prompt)."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((groups, 1 + k, 3, 64, 64), dtype=np.uint8)
    caps = []
    for gi in range(groups):
        p = prompts[int(rng.integers(len(prompts)))]
        spec = parse(p)
        row = [p]
        imgs[gi, 0] = np.round(render(spec, int(rng.integers(2**31))) * 255)
        for j in range(k):
            neg, _ = perturb(spec, rng)
            row.append(caption(neg))
            imgs[gi, 1 + j] = np.round(render(neg, int(rng.integers(2**31))) * 255)
        caps.append(row)
    return torch.from_numpy(imgs), caps


@torch.no_grad()
def vae_roundtrip(images_u8: torch.Tensor, frac: float, seed: int, chunk: int = 256) -> torch.Tensor:
    """Pass a random ``frac`` of the groups through the world VAE (in place on a copy)."""
    from diffusers import AutoencoderKL

    from engine.world.model import WEIGHTS_DIR

    vae = AutoencoderKL.from_pretrained(WEIGHTS_DIR, subfolder="vae", local_files_only=True).eval()
    g = torch.Generator().manual_seed(seed)
    out = images_u8.clone()
    pick = torch.nonzero(torch.rand(images_u8.shape[0], generator=g) < frac).flatten()
    flat = out.flatten(0, 1)
    idx = (pick[:, None] * images_u8.shape[1] + torch.arange(images_u8.shape[1])).flatten()
    for i in range(0, len(idx), chunk):
        sel = idx[i:i + chunk]
        x = flat[sel].float() / 255 * 2 - 1
        z = vae.encode(x).latent_dist.sample(generator=g)
        y = vae.decode(z).sample
        flat[sel] = ((y * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x (G, N, 3, H, W) float in [0, 1]; one noise level and blur per group."""
    G = x.shape[0]
    sigma = torch.rand(G, 1, 1, 1, 1, generator=gen) * 0.06
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(G, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        sub = x[blur].flatten(0, 1)
        sub = F.conv2d(F.pad(sub, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        x[blur] = sub.view(-1, x.shape[1], *x.shape[2:])
    return x.clamp(0, 1)


class Texts:
    """MiniLM tokens and masks of every prompt seen, computed once."""

    def __init__(self, prompts):
        from engine.world.text import MiniLMTextEncoder

        enc = MiniLMTextEncoder(max_length=16, cache=False)
        self.index = {p: i for i, p in enumerate(prompts)}
        toks, masks = [], []
        for i in range(0, len(prompts), 256):
            t, _, m = enc.encode_with_mask(prompts[i:i + 256])
            toks.append(t)
            masks.append(m)
        self.tokens, self.masks = torch.cat(toks), torch.cat(masks)

    def __call__(self, caps):
        idx = torch.tensor([self.index[c] for c in caps])
        return self.tokens[idx], self.masks[idx]


def group_losses(net, images: torch.Tensor, caps: list[list[str]], texts: Texts, m_others: int,
                 gen: torch.Generator):
    """images (G, 1 + K, 3, H, W) float -> (image-side loss, text-side loss, pairwise accuracy)."""
    G, N = images.shape[:2]
    K = N - 1
    tok = net.image_tokens(images.flatten(0, 1)).view(G, N, -1, net.cfg.dim)
    # image side: prompt g against its N images and M true renders of other groups
    others = torch.stack([(g + 1 + torch.randperm(G - 1, generator=gen)[:m_others]) % G for g in range(G)])
    cand = torch.cat([tok, tok[others, 0]], 1)                       # (G, N + M, P, D)
    t, m = texts([c[0] for c in caps])
    C = cand.shape[1]
    s_img = net.score_tokens(cand.flatten(0, 1), t.repeat_interleave(C, 0), m.repeat_interleave(C, 0)).view(G, C)
    # text side: the true render against the K edited prompts (index 0 is shared with s_img)
    t2, m2 = texts([c for row in caps for c in row[1:]])
    s_txt = net.score_tokens(tok[:, 0].repeat_interleave(K, 0), t2, m2).view(G, K)
    s_txt = torch.cat([s_img[:, :1], s_txt], 1)
    target = torch.zeros(G, dtype=torch.long)
    acc = (s_img[:, :1] > s_img[:, 1:N]).float().mean()
    return F.cross_entropy(s_img, target), F.cross_entropy(s_txt, target), acc


@torch.no_grad()
def evaluate(net, images_u8, caps, texts, batch: int = 64) -> dict:
    net.eval()
    acc_img, acc_txt, n = 0.0, 0.0, 0
    for i in range(0, images_u8.shape[0], batch):
        x = images_u8[i:i + batch].float() / 255
        G, N = x.shape[:2]
        c = caps[i:i + batch]
        t, m = texts([row[0] for row in c])
        s = net(x.flatten(0, 1), t.repeat_interleave(N, 0), m.repeat_interleave(N, 0)).view(G, N)
        acc_img += float((s[:, :1] > s[:, 1:]).float().sum())
        t2, m2 = texts([p for row in c for p in row])
        s2 = net(x[:, 0].repeat_interleave(N, 0), t2, m2).view(G, N)
        acc_txt += float((s2[:, :1] > s2[:, 1:]).float().sum())
        n += G * (N - 1)
    net.train()
    return {"acc_image_side": acc_img / n, "acc_text_side": acc_txt / n}


@torch.no_grad()
def judge_correlation(net, texts, n: int = 128, seed: int = 0) -> dict:
    """Spearman correlation of reward and judge on the pretrained world model's own samples
    (a diagnostic: the reward was not fitted to it)."""
    from scipy.stats import spearmanr

    from engine.schedule import flux_sigmas
    from engine.world.judge import judge
    from engine.world.model import load_world_flux
    from engine.world.text import MiniLMTextEncoder

    flux = load_world_flux()
    enc = MiniLMTextEncoder(max_length=16)
    out = {}
    net.eval()
    for name, pool in (("train", train_prompts()), ("test", test_prompts())):
        rng = np.random.default_rng(seed)
        prompts = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
        pe, pooled = enc.encode(prompts)
        cond = flux.condition(pe, pooled, 64, 64)
        x = flux.noise(n, 64, 64, generator=torch.Generator().manual_seed(seed))
        x0 = flux.rollout(x, flux_sigmas(25, flux.image_seq_len(64, 64)), cond)
        images = flux.decode(x0, 64, 64)
        t, m = texts(prompts)
        r = net(images, t, m).numpy()
        j = judge(images, prompts).score
        out[name] = {"spearman": float(spearmanr(r, j).statistic), "reward_mean": float(r.mean()),
                     "judge_mean": float(j.mean())}
    net.train()
    return out


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=REWARD_DIR)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--groups", type=int, default=6000)
    ap.add_argument("--val-groups", type=int, default=400)
    ap.add_argument("--k", type=int, default=3, help="near misses per group")
    ap.add_argument("--m", type=int, default=3, help="other groups' renders per prompt")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--vae-frac", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    LOG = os.path.join(args.out, "train_log.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # black backgrounds make the VAE's activations denormal on CPU
    torch.manual_seed(args.seed)
    log(f"=== train_world_reward.py {' '.join(sys.argv[1:])} (torch {torch.__version__}, "
        f"threads {torch.get_num_threads()})")

    t0 = time.time()
    train, test = train_prompts(), test_prompts()
    imgs, caps = build_bank(train, args.groups, args.k, args.seed)
    vimgs, vcaps = build_bank(test, args.val_groups, args.k, args.seed + 1)
    log(f"banks: {args.groups} train groups / {args.val_groups} test groups of 1 + {args.k} renders "
        f"({time.time() - t0:.0f}s)")
    t0 = time.time()
    imgs = vae_roundtrip(imgs, args.vae_frac, args.seed)
    vimgs = vae_roundtrip(vimgs, args.vae_frac, args.seed + 1)
    log(f"VAE round trip on {args.vae_frac:.0%} of the groups ({time.time() - t0:.0f}s)")
    texts = Texts(all_prompts())   # every edit of a grammar prompt is a grammar prompt

    net = WorldRewardNet(RewardNetConfig())
    log(f"reward net: {sum(p.numel() for p in net.parameters()):,} parameters")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    start, step, best = time.time(), 0, -1.0
    while step < args.steps:
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * frac))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(imgs.shape[0], (args.batch,), generator=gen)
        x = augment(imgs[idx].float() / 255, gen)
        l_img, l_txt, acc = group_losses(net, x, [caps[i] for i in idx.tolist()], texts, args.m, gen)
        loss = l_img + l_txt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0))
        opt.step()
        step += 1
        if step % 25 == 0:
            log(f"step {step} t={time.time() - start:.0f}s lr={lr:.2e} loss_img={float(l_img):.3f} "
                f"loss_txt={float(l_txt):.3f} acc={float(acc):.3f} gnorm={gn:.2f}")
        if step % 200 == 0:
            v = evaluate(net, vimgs, vcaps, texts)
            log(f"step {step}: test-prompt pairs {v}")
            if v["acc_image_side"] > best:
                best = v["acc_image_side"]
                save_reward_net(net, args.out)
    v = evaluate(net, vimgs, vcaps, texts)
    log(f"final ({step} steps, {time.time() - start:.0f}s): test-prompt pairs {v}; train-prompt pairs "
        f"{evaluate(net, imgs[:400], caps[:400], texts)}")
    if v["acc_image_side"] > best:
        best = v["acc_image_side"]
        save_reward_net(net, args.out)
    from engine.world.reward import load_reward_net

    kept = load_reward_net(args.out)
    log(f"kept the net with the best test-prompt image-side accuracy ({best:.3f})")
    log(f"diagnostic, reward vs judge on the pretrained model's samples: {judge_correlation(kept, texts)}")


if __name__ == "__main__":
    main()
