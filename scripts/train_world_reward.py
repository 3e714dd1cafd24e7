"""Train the world's learned reward (engine/world/reward.py) on the renderer's training prompts.

Data (all from the TRAINING split of the prompts; the judge is never consulted):
  a bank of groups, each one training prompt p with a true render of p and K renders of one-edit
  near misses of p (engine/world/pairs.py; relation and count edits drawn more often, since those
  are the hard ones), every render with its layout (object centres, colours, shapes). A share of
  the groups passes through the world VAE (encode -> decode), so that the reward holds on the
  blurrier, off-colour images a decoder produces. Each group also holds its true render spoiled
  the way fine-tuning against an earlier version of this reward spoiled its samples (objects
  painted in stripes, checks or speckles of another or a dimmed colour; ``spoil``): wrong by
  construction, and labelled so (their objects' colour is "none of the palette's").
  With ``--negatives`` (the shipped weights' third stage), losers that are not renders (files written by
  scripts/measure_world_reward.py --collect): the world model's own samples of training prompts
  and the samples of fine-tuning runs against an earlier reward (what it scored too high). They
  are used only as "a true render of p beats this image for p" (true renders are correct by
  construction; nothing needs to decide how wrong the sample is).
Loss per step:
  dense    the renderer's layout supervises the perception: object-centre density (a Gaussian of
           mass 1 per object on the 16x16 grid), its total, and colour / shape at each centre;
  ranking  margin ranking, s(true render, p) >= s(near miss, p) + 1, and the same against the
           model's samples and exploits (a hinge: no pressure once the order holds, so the
           penalty weights do not grow without end).
Online augmentation: Gaussian pixel noise, random blur and a small translation (applied to the
layout too), one draw per image.
Validation (printed, never used to pick anything but the last step's weights): pairwise accuracy
per edit kind on a bank of TRAINING prompts held out of the training bank's draws.

Usage (the shipped weights, in three stages; their logs are engine/world/weights/reward/train_log.txt):
  python scripts/train_world_reward.py --threads 1 --steps 450 --groups 2500 --no-spoiled --out runs/reward_r2
  python scripts/train_world_reward.py --threads 1 --steps 300 --groups 2500 --lr 1e-3 \
      --init runs/reward_r2 --out runs/reward_r3
  # a round against the model's own and fine-tuned samples: LeapAlign against r3 (1x and 3x the
  # default job's steps), their samples of training prompts collected, then r3 trained on as losers
  python scripts/measure_world_reward.py --threads 1 --reward runs/reward_r3 --collect runs/neg_r3
  python scripts/train_world_reward.py --threads 2 --steps 300 --groups 2500 --lr 5e-4 --init runs/reward_r3 \
      --negatives runs/neg_r3/base.pt runs/neg_r3/finetune_1x.pt runs/neg_r3/finetune_3x.pt --out runs/reward_r4
(stage 1 was run before the colour head had its "none of the palette's" class, so its colour head
had 7 outputs and stage 2 started that head afresh; --init loads every tensor whose shape fits.
runs/reward_r4 is what engine/world/weights/reward ships.)
Then scripts/measure_world_reward.py measures it (its report there was made on runs/reward_r4). The budget is in steps (not minutes) so that
the weights do not depend on the machine's load.
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

from engine.report import RunLog  # noqa: E402
from engine.world import COLOURS, SHAPES, caption, parse, train_prompts  # noqa: E402
from engine.world.pairs import EDITS, perturb  # noqa: E402
from engine.world.reward import (REWARD_DIR, RewardNetConfig, WorldRewardNet, encode_prompts,  # noqa: E402
                                 save_reward_net)
from engine.world.scene import layout, render_objects  # noqa: E402

log = RunLog()
EDIT_WEIGHTS = {"colour": 1.0, "shape": 1.5, "count": 3.0, "relation": 3.0, "drop": 1.0, "add": 1.0}
_C = {c: i for i, c in enumerate(COLOURS)}
_S = {s: i for i, s in enumerate(SHAPES)}


def render_with_layout(spec, seed: int):
    objs = layout(spec, seed)
    img = render_objects(objs)
    lay = np.full((4, 4), -1.0, dtype=np.float32)
    for i, o in enumerate(objs):
        lay[i] = (o.cx, o.cy, _C[o.colour], _S[o.shape])
    return img, lay


OTHER_COLOUR = len(COLOURS)   # the colour head's "none of the palette's"


def spoil(img: np.ndarray, lay: np.ndarray, rng: np.random.Generator):
    """A true render made wrong the way fine-tuning spoils images (seen in the samples of runs
    against an earlier reward): the objects painted in stripes or checks of other palette colours,
    or speckled. Wrong by construction: no object keeps one colour of the palette. -> image and
    its layout with every object's colour set to "none of the palette's"."""
    out = img.copy()
    mask = img.max(0) > 0.05
    yy, xx = np.mgrid[0:64, 0:64]
    period = int(rng.integers(2, 7))
    style = int(rng.integers(4))
    if style == 0:
        pat = (xx // period) % 2 == 1
    elif style == 1:
        pat = (yy // period) % 2 == 1
    elif style == 2:
        pat = ((xx // period) + (yy // period)) % 2 == 1
    else:
        pat = rng.random((64, 64)) < rng.uniform(0.3, 0.6)
    names = list(COLOURS)
    pick = int(rng.integers(len(names)))
    other = np.asarray(COLOURS[names[pick]], dtype=np.float32)
    if rng.random() < 0.5 or pick in set(lay[lay[:, 2] >= 0, 2].astype(int).tolist()):
        other = other * rng.uniform(0.3, 0.7)            # a dimmed, off-palette shade
    cover = mask & pat
    out[:, cover] = other[:, None]
    lay = lay.copy()
    lay[lay[:, 2] >= 0, 2] = OTHER_COLOUR
    return out, lay


def build_bank(prompts: list[str], groups: int, k: int, seed: int, weights=EDIT_WEIGHTS, spoiled: bool = True):
    """-> images uint8 (G, 1 + K (+ 1), 3, 64, 64), layouts (G, 1 + K (+ 1), 4, 4) (cx, cy, colour,
    shape; -1 rows: no object), the true prompts [G] and the losers' kinds [G][K (+ 1)]: K
    near misses and, with ``spoiled``, the true render spoiled (``spoil``)."""
    rng = np.random.default_rng(seed)
    n = 1 + k + int(spoiled)
    imgs = np.zeros((groups, n, 3, 64, 64), dtype=np.uint8)
    lays = np.zeros((groups, n, 4, 4), dtype=np.float32)
    caps, kinds = [], []
    for gi in range(groups):
        p = prompts[int(rng.integers(len(prompts)))]
        spec = parse(p)
        img, lays[gi, 0] = render_with_layout(spec, int(rng.integers(2**31)))
        imgs[gi, 0] = np.round(img * 255)
        row = []
        if spoiled:
            bad, lays[gi, n - 1] = spoil(img, lays[gi, 0], rng)
            imgs[gi, n - 1] = np.round(bad * 255)
        for j in range(k):
            neg, kind = perturb(spec, rng, weights=weights)
            row.append(kind)
            img, lays[gi, 1 + j] = render_with_layout(neg, int(rng.integers(2**31)))
            imgs[gi, 1 + j] = np.round(img * 255)
        caps.append(p)
        kinds.append(row + ["spoiled"] * int(spoiled))
    return torch.from_numpy(imgs), torch.from_numpy(lays), caps, kinds


def load_vae():
    from diffusers import AutoencoderKL

    from engine.world.model import WEIGHTS_DIR

    return AutoencoderKL.from_pretrained(WEIGHTS_DIR, subfolder="vae", local_files_only=True).eval()


@torch.no_grad()
def vae_roundtrip(images_u8: torch.Tensor, frac: float, seed: int, chunk: int = 256, vae=None) -> torch.Tensor:
    """Pass a random ``frac`` of the groups through the world VAE (on a copy)."""
    vae = vae or load_vae()
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


def augment(x: torch.Tensor, lay: torch.Tensor | None, gen: torch.Generator, shift: int = 2):
    """x (N, 3, H, W) float in [0, 1], lay (N, 4, 4) or None: per-image noise, blur, shift."""
    N = x.shape[0]
    sigma = torch.rand(N, 1, 1, 1, generator=gen) * 0.05
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(N, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    if shift:
        # objects keep >= 2 px to the border, so a shift of <= 2 px (zero-filled) keeps them whole
        d = torch.randint(-shift, shift + 1, (N, 2), generator=gen)
        out = torch.zeros_like(x)
        H, W = x.shape[-2:]
        for i in range(N):
            dx, dy = int(d[i, 0]), int(d[i, 1])
            out[i, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
                x[i, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
        x = out
        if lay is not None:
            lay = lay.clone()
            real = lay[..., 2] >= 0
            lay[..., 0] += torch.where(real, d[:, None, 0].float(), 0.0)
            lay[..., 1] += torch.where(real, d[:, None, 1].float(), 0.0)
    return x.clamp(0, 1), lay


def dense_loss(net: WorldRewardNet, images: torch.Tensor, lay: torch.Tensor, sigma_cells: float = 0.8):
    """The renderer's layout supervises the maps: density (Gaussian of mass 1 per object),
    its total, and colour / shape at each object's centre."""
    dens, lc, ls = net.maps(images)
    N, g, _ = dens.shape
    scale = net.cfg.image_size / g
    c = (torch.arange(g, dtype=dens.dtype) + 0.5)
    real = lay[..., 2] >= 0                                           # (N, 4)
    cx, cy = lay[..., 0] / scale, lay[..., 1] / scale                  # in cells
    gx = torch.exp(-0.5 * ((c[None, None, :] - cx[..., None]) / sigma_cells) ** 2)   # (N, 4, g)
    gy = torch.exp(-0.5 * ((c[None, None, :] - cy[..., None]) / sigma_cells) ** 2)
    bump = gy[..., :, None] * gx[..., None, :]                          # (N, 4, g, g)
    bump = bump / bump.flatten(2).sum(-1).clamp_min(1e-8)[..., None, None]
    bump = bump * real[..., None, None]
    target = bump.sum(1)
    l_dens = ((dens - target) ** 2).sum((1, 2)).mean() * 10
    l_tot = ((dens.sum((1, 2)) - real.sum(1)) ** 2).mean()
    col = lay[..., 2].clamp_min(0).long()
    shp = lay[..., 3].clamp_min(0).long()
    lc_at = torch.gather(lc, 1, col[..., None, None].expand(N, 4, g, g))   # (N, 4, g, g)
    ls_at = torch.gather(ls, 1, shp[..., None, None].expand(N, 4, g, g))
    n_obj = real.sum().clamp_min(1)
    l_col = -(bump * lc_at).sum() / n_obj
    l_shp = -(bump * ls_at).sum() / n_obj
    return l_dens, l_tot, l_col, l_shp


def load_negatives(files: list[str]):
    """-> uint8 images (M, 3, 64, 64) and their prompts, from ``--collect`` files."""
    imgs, prompts = [], []
    for f in files:
        d = torch.load(f)
        imgs.append(d["images"])
        prompts += list(d["prompts"])
        log(f"negatives: {len(d['prompts'])} images from {f} ({d.get('source', '?')})")
    if not imgs:
        return None, []
    return torch.cat(imgs), prompts


@torch.no_grad()
def pair_accuracy(net, images_u8, caps, kinds, batch: int = 64) -> dict:
    net.eval()
    hits = {k: [] for k in (*EDITS, "spoiled")}
    for i in range(0, images_u8.shape[0], batch):
        x = images_u8[i:i + batch].float() / 255
        G, N = x.shape[:2]
        codes = encode_prompts(caps[i:i + batch]).repeat_interleave(N, 0)
        s = net(x.flatten(0, 1), codes).view(G, N)
        ok = (s[:, :1] > s[:, 1:])
        for gi in range(G):
            for j in range(N - 1):
                hits[kinds[i + gi][j]].append(float(ok[gi, j]))
    net.train()
    return {k: round(float(np.mean(v)), 3) for k, v in hits.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=REWARD_DIR)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--groups", type=int, default=3000)
    ap.add_argument("--val-groups", type=int, default=200)
    ap.add_argument("--k", type=int, default=3, help="near misses per group")
    ap.add_argument("--batch", type=int, default=16, help="groups per step")
    ap.add_argument("--neg-batch", type=int, default=16, help="model samples / exploits per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vae-frac", type=float, default=0.4)
    ap.add_argument("--rank-weight", type=float, default=0.5)
    ap.add_argument("--negatives", nargs="*", default=[])
    ap.add_argument("--no-spoiled", action="store_true", help="no spoiled true renders among the losers")
    ap.add_argument("--init", default="", help="start from these weights (a reward folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log.path = os.path.join(args.out, "train_log.txt")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # black backgrounds make the VAE's activations denormal on CPU
    torch.manual_seed(args.seed)
    log(f"=== train_world_reward.py {' '.join(sys.argv[1:])} (torch {torch.__version__}, "
        f"threads {torch.get_num_threads()})")

    t0 = time.time()
    train = train_prompts()
    # validation: training prompts (test prompts are for the measurement script only)
    imgs, lays, caps, _ = build_bank(train, args.groups, args.k, args.seed, spoiled=not args.no_spoiled)
    vimgs, _, vcaps, vkinds = build_bank(train, args.val_groups, args.k, args.seed + 1, weights=None)
    log(f"banks: {args.groups} train groups / {args.val_groups} validation groups of 1 + {args.k} renders "
        f"({time.time() - t0:.0f}s)")
    t0 = time.time()
    vae = load_vae()
    imgs = vae_roundtrip(imgs, args.vae_frac, args.seed, vae=vae)
    vimgs = vae_roundtrip(vimgs, args.vae_frac, args.seed + 1, vae=vae)
    log(f"VAE round trip on {args.vae_frac:.0%} of the groups ({time.time() - t0:.0f}s)")
    neg_imgs, neg_prompts = load_negatives(args.negatives)
    neg_codes = encode_prompts(neg_prompts) if neg_prompts else None
    true_for_neg = None
    if neg_prompts:
        # one true render per negative (same prompt), fixed seeds; half through the VAE
        rng = np.random.default_rng(args.seed + 2)
        t = np.stack([np.round(render_with_layout(parse(p), int(rng.integers(2**31)))[0] * 255) for p in neg_prompts])
        true_for_neg = vae_roundtrip(torch.from_numpy(t.astype(np.uint8))[:, None], 0.5, args.seed + 2, vae=vae)[:, 0]

    net = WorldRewardNet(RewardNetConfig())
    if args.init:
        from safetensors.torch import load_file

        own = net.state_dict()
        init = {k: v for k, v in load_file(os.path.join(args.init, "model.safetensors")).items()
                if k in own and own[k].shape == v.shape}
        net.load_state_dict(init, strict=False)
        log(f"initialised from {args.init} (new: {sorted(set(own) - set(init))})")
    log(f"reward net: {sum(p.numel() for p in net.parameters()):,} parameters")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        frac = (step - 1) / args.steps
        lr = args.lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(imgs.shape[0], (args.batch,), generator=gen)
        G, N = args.batch, imgs.shape[1]
        x, lay = augment(imgs[idx].flatten(0, 1).float() / 255, lays[idx].flatten(0, 1), gen)
        l_dens, l_tot, l_col, l_shp = dense_loss(net, x, lay)
        codes = encode_prompts([caps[i] for i in idx.tolist()]).repeat_interleave(N, 0)
        s = net(x, codes).view(G, N)
        l_rank = F.relu(1.0 - (s[:, :1] - s[:, 1:])).mean()
        acc = float((s[:, :1] > s[:, 1:]).float().mean())
        l_neg = torch.zeros(())
        if neg_imgs is not None and args.neg_batch:
            j = torch.randint(neg_imgs.shape[0], (args.neg_batch,), generator=gen)
            both = torch.cat([true_for_neg[j], neg_imgs[j]]).float() / 255
            both, _ = augment(both, None, gen)
            sn = net(both, neg_codes[j].repeat(2, 1)).view(2, -1)
            l_neg = F.relu(1.0 - (sn[0] - sn[1])).mean()
        loss = l_dens + 0.1 * l_tot + l_col + l_shp + args.rank_weight * (l_rank + l_neg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        l_dens, l_tot, l_col, l_shp, l_rank, l_neg = (v.detach() for v in (l_dens, l_tot, l_col, l_shp, l_rank, l_neg))
        gn = float(torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0))
        opt.step()
        if step % 25 == 0:
            log(f"step {step} t={time.time() - start:.0f}s lr={lr:.2e} dens={float(l_dens):.3f} "
                f"tot={float(l_tot):.3f} col={float(l_col):.3f} shp={float(l_shp):.3f} rank={float(l_rank):.3f} "
                f"neg={float(l_neg):.3f} acc={acc:.3f} gnorm={gn:.2f}")
        if step % 200 == 0 or step == args.steps:
            log(f"step {step}: validation (training prompts) pair accuracy by edit {pair_accuracy(net, vimgs, vcaps, vkinds)}")
    save_reward_net(net, args.out)
    log(f"wrote {args.out} after {args.steps} steps ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
