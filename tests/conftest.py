import pytest
import torch

from fusion.data.text import TextTokenizer, shapes_corpus


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer() -> TextTokenizer:
    """A small ShapesWorld BPE (trained in ~0.2 s) so tests never depend on shipped files."""
    return TextTokenizer.train(shapes_corpus(500), vocab_size=400, show_progress=False)


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny networks gain nothing from a second, and on a shared
    2-core CPU a two-thread process waits at OpenMP barriers for a parked thread (one file of
    tiny VQ-GAN tests took 121 s with two threads and ~30 s with one at load 2.5)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random 4-channel VAE artifact (16 channels wide): fast stand-in for shapes-vae."""
    from fusion.image.vae import VAETokenizer, build_autoencoder

    path = tmp_path_factory.mktemp("vae")
    VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).save_pretrained(path)
    return path


@pytest.fixture
def scripted(monkeypatch):
    """Make the samplers' text decoder emit ``script`` (one token per draw; one it may not
    draw now is passed over), then whatever the model prefers: the decisions an interleaved
    model makes, made for an untrained one (tests/test_interleaved.py, tests/test_api.py)."""
    import fusion.sampling.base as base

    real = base.sample_token

    def use(script):
        tokens = iter(script)

        def draw(logits, sampling, allowed=None, generator=None):
            for tok in tokens:  # a scripted token that is not allowed now is passed over
                if allowed is None or bool(allowed[tok]):
                    return torch.full((logits.shape[0],), tok, dtype=torch.long)
            return real(logits, sampling, allowed, generator)

        monkeypatch.setattr(base, "sample_token", draw)

    return use
