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


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A random 4-channel VAE artifact (16 channels wide): fast stand-in for shapes-vae."""
    from fusion.image.vae import VAETokenizer, build_autoencoder

    path = tmp_path_factory.mktemp("vae")
    VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).save_pretrained(path)
    return path
