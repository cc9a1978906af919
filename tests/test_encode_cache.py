"""EncodeCache: memoised stage-1 encoding during stage-2 training."""

import pytest
import torch

from fusion.training.encode_cache import EncodeCache


class CountingEncoder:
    """A deterministic stand-in for a tokenizer's encode that records what it was asked."""

    def __init__(self):
        self.images_seen = 0
        self.calls = 0

    def __call__(self, pixels):
        self.calls += 1
        self.images_seen += len(pixels)
        return pixels.flatten(1)[:, :6] * 2 + pixels.mean(dim=(1, 2, 3))[:, None]


def _images(n, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_cached_outputs_equal_fresh_encoding_and_each_image_is_encoded_once():
    enc = CountingEncoder()
    cache = EncodeCache(enc, max_bytes=2**20)
    a, b = _images(4, 0), _images(4, 1)
    first = torch.cat([a, a[:2]])  # in-batch repeats are encoded once
    assert torch.equal(cache(first), enc(first))
    enc.images_seen = 0
    mixed = torch.cat([b[:3], a[1:3], b[:1]])  # 2 old images, 3 new (one repeated)
    assert torch.equal(cache(mixed), CountingEncoder()(mixed))
    assert enc.images_seen == 3  # only the unseen images were encoded
    assert (cache.hits, cache.misses) == (2, 6 + 4)  # repeats of new images count as misses
    assert cache.last_hit_share == pytest.approx(2 / 6)
    assert len(cache) == 7


def test_a_changed_pixel_is_a_different_image():
    enc = CountingEncoder()
    cache = EncodeCache(enc, max_bytes=2**20)
    x = _images(2)
    cache(x)
    y = x.clone()
    y[1, 0, 0, 0] += 1e-6
    assert torch.equal(cache(y), CountingEncoder()(y))
    assert cache.hits == 1 and enc.images_seen == 3


def test_least_recently_used_images_are_evicted_beyond_the_budget():
    enc = CountingEncoder()
    per_image = 6 * 4  # six float32 values
    cache = EncodeCache(enc, max_bytes=3 * per_image)
    x = _images(5)
    cache(x[:3])
    cache(x[:1])  # x0 is now the most recently used
    cache(x[3:4])  # over budget: x1 (least recent) goes
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    enc.images_seen = 0
    assert torch.equal(cache(x[[0, 2, 3]]), CountingEncoder()(x[[0, 2, 3]]))
    assert enc.images_seen == 0  # all three kept
    cache(x[1:2])
    assert enc.images_seen == 1  # x1 had been evicted, so it is encoded again


def test_a_batch_larger_than_the_budget_is_still_returned_whole():
    cache = EncodeCache(CountingEncoder(), max_bytes=1)
    x = _images(4)
    assert torch.equal(cache(x), CountingEncoder()(x))
    assert cache.bytes <= 1


def test_zero_budget_turns_the_cache_off():
    enc = CountingEncoder()
    cache = EncodeCache(enc, max_bytes=0)
    x = _images(3)
    cache(x)
    cache(x)
    assert enc.images_seen == 6 and len(cache) == 0


def test_bad_input_names_the_expected_shape():
    cache = EncodeCache(CountingEncoder(), max_bytes=2**20)
    with pytest.raises(ValueError, match=r"batch of images \(B, C, H, W\)"):
        cache(torch.zeros(0, 3, 8, 8))


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_real_tokenizers_give_identical_outputs_through_the_cache(kind):
    """The premise of the cache: both stage-1 tokenizers encode deterministically in eval
    mode, so a memoised output is exactly what encoding again would give."""
    from fusion.image.vae import VAETokenizer, build_autoencoder
    from fusion.image.vqgan import VQTokenizer

    torch.manual_seed(0)
    if kind == "vae":
        tok = VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).eval()
    else:
        tok = VQTokenizer({"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8,
                           "latent_channels": 4}).eval()
    cache = EncodeCache(tok.encode, max_bytes=2**20)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        cache(x[:2])
        out = cache(x)  # two hits, two misses
        fresh = tok.encode(x)
    assert cache.hits == 2
    assert out.dtype == fresh.dtype and torch.equal(out, fresh)


def test_the_training_module_encodes_through_its_cache():
    from fusion.config import OptimConfig
    from fusion.training.fusion_module import FusionModule

    class Tokenizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.counter = CountingEncoder()

        def encode(self, pixels):
            return self.counter(pixels)

    tok = Tokenizer()
    module = FusionModule(torch.nn.Linear(2, 2), None, tok, OptimConfig(), max_steps=10,
                          encode_cache_mb=1)
    x = _images(3)
    module.encode(x)
    module.encode(x)
    assert tok.counter.images_seen == 3
    off = FusionModule(torch.nn.Linear(2, 2), None, Tokenizer(), OptimConfig(), max_steps=10)
    off.encode(x)
    off.encode(x)
    assert off.image_tokenizer.counter.images_seen == 6  # the module's default: no cache
