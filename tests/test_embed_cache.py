import pytest
import torch
from safetensors import safe_open

from engine.flux.embed_cache import (CachedTextEncoder, cache_key, encoder_identity, pipeline_encoder_id,
                                     precompute)
from engine.flux.tiny import HashTextEncoder

PROMPTS = ["a red square", "a blue circle", "a green cat on a mat"]


class Counting:
    """Wraps an encoder and records every batch it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


@pytest.fixture
def enc():
    return HashTextEncoder(32, 32, seed=0)


def test_hits_skip_the_encoder_and_round_trip_exactly(tmp_path, enc):
    counting = Counting(enc)
    cache = CachedTextEncoder(counting, tmp_path, encoder_identity(enc))
    pe, pooled = cache.encode(PROMPTS[:2])
    assert counting.calls == [PROMPTS[:2]]
    ref_pe, ref_pooled = enc.encode(PROMPTS)
    pe2, pooled2 = cache.encode(PROMPTS + [PROMPTS[0]])     # two hits, one miss, a repeat
    assert counting.calls == [PROMPTS[:2], PROMPTS[2:]]      # only the miss was encoded
    assert torch.equal(pe2[:3], ref_pe) and torch.equal(pooled2[:3], ref_pooled)
    assert torch.equal(pe2[3], ref_pe[0]) and torch.equal(pe, ref_pe[:2])
    # a fresh cache over the same folder: everything from disk, no encoder at all
    ro = CachedTextEncoder(None, tmp_path, encoder_identity(enc))
    pe3, pooled3 = ro.encode(PROMPTS)
    assert torch.equal(pe3, ref_pe) and torch.equal(pooled3, ref_pooled) and ro.hits == 3
    with pytest.raises(KeyError, match="not in the embedding cache"):
        ro.encode(["a prompt never seen"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_bf16_round_trip_and_layout(tmp_path):
    class Bf16:
        def encode(self, prompts):
            g = torch.Generator().manual_seed(len(prompts))
            return (torch.randn(len(prompts), 7, 5, generator=g).bfloat16(),
                    torch.randn(len(prompts), 3, generator=g).bfloat16())

    pe, pooled = CachedTextEncoder(Bf16(), tmp_path, "bf16-test").encode(PROMPTS)
    pe2, pooled2 = CachedTextEncoder(None, tmp_path, "bf16-test").encode(PROMPTS)
    assert pe2.dtype == torch.bfloat16 and torch.equal(pe, pe2) and torch.equal(pooled, pooled2)
    key = cache_key("bf16-test", PROMPTS[0])
    path = tmp_path / key[:2] / f"{key}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["prompt"] == PROMPTS[0] and f.metadata()["encoder_id"] == "bf16-test"
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3   # one file per prompt


def test_encoder_identity_separates_entries(tmp_path, enc):
    other = HashTextEncoder(32, 32, seed=1)
    assert encoder_identity(enc) != encoder_identity(other)
    assert encoder_identity(enc) != encoder_identity(HashTextEncoder(32, 32, seed=0, max_length=8))
    CachedTextEncoder(enc, tmp_path).encode(PROMPTS)
    counting = Counting(other)
    pe, _ = CachedTextEncoder(counting, tmp_path, encoder_identity(other)).encode(PROMPTS)
    assert counting.calls == [PROMPTS] and torch.equal(pe, other.encode(PROMPTS)[0])

    from engine.flux.text import PipelineTextEncoder

    class FakePipe:
        name_or_path = str(tmp_path / "flux")

        class text_encoder_2:
            dtype = torch.bfloat16

    fake = PipelineTextEncoder.__new__(PipelineTextEncoder)
    fake.pipe, fake.max_sequence_length = FakePipe(), 512
    assert encoder_identity(fake) == pipeline_encoder_id(str(tmp_path / "flux"), 512, torch.bfloat16)
    assert pipeline_encoder_id("a", 512) != pipeline_encoder_id("a", 256) != pipeline_encoder_id("b", 256)
    counting.cache_id = "my-encoder-v1"
    assert encoder_identity(counting) == "my-encoder-v1"
    with pytest.raises(TypeError, match="pass encoder_id"):
        encoder_identity(object())


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_file_is_recomputed_with_a_warning(tmp_path, enc, damage):
    precompute(enc, PROMPTS, tmp_path, encoder_identity(enc))
    key = cache_key(encoder_identity(enc), PROMPTS[1])
    path = tmp_path / key[:2] / f"{key}.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-5] ^= 0x40                  # one bit inside the tensor bytes: only the checksum sees it
    else:
        data = b"not safetensors"
    path.write_bytes(bytes(data))

    with pytest.raises(ValueError, match=key):     # no encoder: an error naming the file
        CachedTextEncoder(None, tmp_path, encoder_identity(enc)).encode(PROMPTS)
    counting = Counting(enc)
    cache = CachedTextEncoder(counting, tmp_path, encoder_identity(enc))
    with pytest.warns(UserWarning, match=f"corrupt embedding cache file .*{key}"):
        pe, pooled = cache.encode(PROMPTS)
    assert counting.calls == [[PROMPTS[1]]]
    ref = enc.encode(PROMPTS)
    assert torch.equal(pe, ref[0]) and torch.equal(pooled, ref[1])
    CachedTextEncoder(None, tmp_path, encoder_identity(enc)).encode(PROMPTS)   # rewritten: clean again


def test_precompute_and_factory(tmp_path, enc):
    built = []

    def factory():
        built.append(Counting(enc))
        return built[-1]

    assert precompute(factory, PROMPTS, tmp_path, "hash", batch_size=2) == 3
    assert len(built) == 1 and built[0].calls == [PROMPTS[:2], PROMPTS[2:]]
    cache = CachedTextEncoder(factory, tmp_path, "hash")
    assert cache.precompute(PROMPTS) == 0 and len(built) == 1      # all hits: never built
    cache.encode(["a new prompt"])
    assert len(built) == 2
    cache.release()
    assert cache._encoder is None
    with pytest.raises(ValueError, match="encoder_id"):
        CachedTextEncoder(factory, tmp_path)


def test_trainer_uses_the_cache(tmp_path):
    from engine import LeapTrainer
    from engine.config import load_config

    over = ["model.height=32", "model.width=32", "num_steps=2", "batch_size=2", "samples=2",
            "prompts=[a red square, a blue circle]", f"output_dir={tmp_path}"]
    plain = LeapTrainer(load_config(None, over))
    cached = LeapTrainer(load_config(None, over + [f"embed_cache_dir={tmp_path / 'cache'}"]))
    assert isinstance(cached.text_encoder, CachedTextEncoder)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2    # precomputed at start
    a, b = plain.step(), cached.step()
    assert a["loss"] == b["loss"] and a["reward"] == b["reward"]
    for n, p in plain.params.items():
        assert torch.equal(p, cached.params[n]), n
