"""Data parallel training on CPU: two gloo processes, the tiny model, against one process.

One update depends on the global batch only (batch_size * grad_accum * world_size), so 2 ranks x
batch 1 (DDP or FSDP2), 1 process x batch 2 and 1 process x batch 1 x grad_accum 2 must give the
same weights, up to the order of floating-point sums; and a checkpoint moves between them.
"""
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine.config import load_config
from engine.rewards import ColourReward

ROOT = Path(__file__).resolve().parents[1]
# grad_clip low enough that every step clips: the clipping norm is a cross-rank quantity too.
# optim.eps 1e-6, not 1e-8: Adam's first step is lr * g / (|g| + eps), so at eps 1e-8 a weight
# whose gradient cancels to ~3e-9 turns a 1e-12 difference in summation order (batch 2 against
# 2 x batch 1) into a 2e-6 weight difference; the test is of the batch arithmetic, not of that.
BASE = ["model.height=32", "model.width=32", "num_steps=3", "optim.lr=1e-3", "optim.grad_clip=0.05", "optim.eps=1e-6",
        "prompts=[a red square, a blue circle, a green field]", "samples=2", "device=cpu"]
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=4"]


def cfg(out, *extra):
    return load_config(None, [*BASE, f"output_dir={out}", *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NaNOnRank1(ColourReward):
    def score(self, images, prompts):
        import torch.distributed as dist

        r = super().score(images, prompts)
        return r * float("nan") if dist.get_rank() == 1 else r


def _rank_main(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from engine import LeapTrainer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")   # the trainers join it (torchrun's own start is test_cli_torchrun)
    try:
        for name, extra in [("ddp", ["distributed=ddp"]), ("fsdp", ["distributed=fsdp"]),
                            ("ddp_lora", ["distributed=ddp", *LORA]), ("fsdp_lora", ["distributed=fsdp", *LORA])]:
            t = LeapTrainer(cfg(out / name, *extra))
            assert t.dist.world == 2 and t.dist.rank == rank
            t.step()
            t.save_checkpoint(out / name / "ck1.safetensors")   # collective under FSDP, rank 0 writes
            if "lora" in name:
                continue
            t.step()
            t.save_checkpoint(out / name / "ck2.safetensors")
            # train()'s closing evaluations: the EMA swap must reach every shard (FSDP's root too)
            images = {"raw": t.evaluate()[1].contiguous(), "ema": t.evaluate(ema=True)[1].contiguous()}
            if rank == 0:
                save_file(images, out / name / "eval_images.safetensors")
            # a checkpoint written by one process, cut into this run's shards
            r = LeapTrainer(cfg(out / name, *extra))
            r.load_checkpoint(out / "single" / "ck1.safetensors")
            r.step()
            r.save_checkpoint(out / name / "ck2_from_single.safetensors")

        t = LeapTrainer(cfg(out / "nan", "distributed=ddp", "grad_accum=2"), reward=NaNOnRank1())
        before = {n: p.detach().clone() for n, p in t.params.items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = t.step()
        assert m["skipped_step"] and t.skipped == 1 and not t.optimizer.state
        assert all(torch.equal(before[n], p) for n, p in t.params.items())
        if rank == 0:   # rank 0's rewards were finite; it skipped because of rank 1's
            assert any("rank(s) [1]" in str(w.message) for w in caught), [str(w.message) for w in caught]
    finally:
        dist.destroy_process_group()


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close(a: dict, b: dict, prefixes=("model.", "ema.", "optim."), atol=1e-6):
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys and sorted(keys) == sorted(k for k in b if k.startswith(prefixes))
    for k in keys:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 2 ranks share the machine's cores; tiny ops gain nothing from more threads, and on a
    loaded machine OpenMP's spinning threads make them seconds slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Single-process references, then one 2-process spawn running every distributed scenario."""
    from safetensors.torch import save_file

    from engine import LeapTrainer

    out = tmp_path_factory.mktemp("dist")
    single = LeapTrainer(cfg(out / "single", "batch_size=2"))
    single.step()
    single.save_checkpoint(out / "single" / "ck1.safetensors")
    single.step()
    single.save_checkpoint(out / "single" / "ck2.safetensors")
    save_file({"raw": single.evaluate()[1].contiguous(), "ema": single.evaluate(ema=True)[1].contiguous()},
              out / "single" / "eval_images.safetensors")
    for name, extra in [("accum", ["grad_accum=2"]), ("single_lora", ["batch_size=2", *LORA])]:
        t = LeapTrainer(cfg(out / name, *extra))
        t.step()
        t.save_checkpoint(out / name / "ck1.safetensors")
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(two_rank_run, mode):
    out = two_rank_run
    two = _tensors(out / mode / "ck1.safetensors")
    _assert_close(two, _tensors(out / "single" / "ck1.safetensors"))   # 2 ranks x 1 == 1 x batch 2
    _assert_close(two, _tensors(out / "accum" / "ck1.safetensors"))    # == 1 x batch 1 x grad_accum 2
    _assert_close(_tensors(out / mode / "ck2.safetensors"), _tensors(out / "single" / "ck2.safetensors"))
    # a one-process checkpoint resumed on 2 ranks continues as the one process did
    _assert_close(_tensors(out / mode / "ck2_from_single.safetensors"), _tensors(out / "single" / "ck2.safetensors"))
    # samples from the trained and the EMA weights, as the one process draws them
    _assert_close(_tensors(out / mode / "eval_images.safetensors"), _tensors(out / "single" / "eval_images.safetensors"),
                  prefixes=("raw", "ema"), atol=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_lora_two_ranks_equal_one_process(two_rank_run, mode):
    lora = _tensors(out := two_rank_run / f"{mode}_lora" / "ck1.safetensors")
    assert all("lora_" in k for k in lora if k.startswith("model.")), out
    _assert_close(lora, _tensors(two_rank_run / "single_lora" / "ck1.safetensors"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_in_one_process(two_rank_run, mode):
    """A 2-rank checkpoint, resumed by one process accumulating 2 micro-batches, makes the update
    the 2 ranks made next."""
    from engine import LeapTrainer

    out = two_rank_run
    t = LeapTrainer(cfg(out / "resume", "grad_accum=2"))
    t.load_checkpoint(out / mode / "ck1.safetensors")
    t.step()
    t.save_checkpoint(out / "resume" / f"{mode}.safetensors")
    mine, theirs = _tensors(out / "resume" / f"{mode}.safetensors"), _tensors(out / mode / "ck2.safetensors")
    _assert_close(mine, theirs)
    assert torch.equal(mine["rng.generator"], theirs["rng.generator"])


def test_distributed_none_under_torchrun_is_refused(tmp_path, monkeypatch):
    from engine import LeapTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="distributed=ddp"):
        LeapTrainer(cfg(tmp_path))
    with pytest.raises(ValueError, match="grad_accum"):
        cfg(tmp_path, "grad_accum=0")
    with pytest.raises(ValueError, match="distributed must be"):
        cfg(tmp_path, "distributed=deepspeed")


def test_cli_torchrun(tmp_path):
    """`torchrun -m engine train ... distributed=ddp`: the ranks join from torchrun's environment;
    one log, one checkpoint, one TensorBoard event file: rank 0's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "engine", "train", "--config", str(ROOT / "configs/tiny.yaml"), "distributed=ddp",
                          "steps=2", "num_steps=3", "model.height=32", "model.width=32", "samples=2", "batch_size=1",
                          "grad_accum=2", "device=cpu", "tensorboard=true", f"output_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and not any(r["skipped_step"] for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2
    assert run.stdout.count("global batch 4") == 1   # printed by rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint.safetensors"]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
