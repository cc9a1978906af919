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
