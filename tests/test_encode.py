"""Stage 1.5 (fusion.training.pre_encode): a dataset encoded once trains exactly as its images do,
without the encoder, and only with the tokenizer that encoded it."""

import random

import pytest
import torch
from omegaconf import OmegaConf

from fusion.config import DataConfig, compose
from fusion.data.documents import StreamCaptionDocument
from fusion.data.export import write_shards
from fusion.data.shards import ShardStream, encoding_of, expand_shards
from fusion.errors import UserError
from fusion.families import build_family, load_image_tokenizer
from fusion.training.pre_encode import check_encoded_data, encode_dataset


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("images")
    write_shards(out, 6, num_images=10, show_progress=False)
    return f"{out}/*.tar"


def _documents(pattern: str, tokenizer) -> list:
    # caption first: the order is keyed by the record's key, which the encoded copy changes
    make = StreamCaptionDocument(tokenizer, None, image_first_ratio=0.0, seed=0)
    stream = ShardStream(expand_shards(pattern), make_document=make, size=64, train=False)
    return [doc for doc, _ in stream]


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_encoded_data_gives_the_loss_of_its_images_without_the_encoder(
        family, image_shards, tmp_path, tiny_vae, tokenizer):
    artifact = str(tiny_vae) if family == "transfusion" else "tokenizers/shapes-vqgan"
    info = encode_dataset(tmp_path / "enc", artifact, shards=image_shards, shard_size=4,
                          batch_size=3, show_progress=False)
    member = "latent.npy" if family == "transfusion" else "codes.npy"
    assert info["member"] == member and info["samples"] == 10
    assert info["dtype"] == ("float32" if family == "transfusion" else "int16")
    assert encoding_of(expand_shards(f"{tmp_path / 'enc'}/*.tar")) == info
    cfg = compose("train", [f"experiment={family}_tiny", f"image_tokenizer={artifact}"])
    torch.manual_seed(0)
    image_tok = load_image_tokenizer(artifact)
    model, loss = build_family(cfg.model, tokenizer, image_tok, 64)
    images = _documents(image_shards, tokenizer)
    encoded = _documents(f"{tmp_path / 'enc'}/*.tar", tokenizer)
    assert len(images) == len(encoded) == 10
    assert all(d.images[0].pre_encoded for d in encoded)

    def refuse(pixels):
        raise AssertionError("the encoder ran on pre-encoded data")

    def run(docs, encode):
        return loss(model, docs, encode, random.Random(1),
                    generator=torch.Generator().manual_seed(2))["loss"]

    with torch.no_grad():
        assert torch.allclose(run(images, image_tok.encode), run(encoded, refuse), atol=1e-5)


def test_encoded_shards_refuse_another_tokenizer(image_shards, tmp_path, tiny_vae):
    from fusion.image.vae import VAETokenizer, build_autoencoder

    encode_dataset(tmp_path / "enc", str(tiny_vae), shards=image_shards, show_progress=False)
    cfg = OmegaConf.structured(DataConfig(source="shards", shards=f"{tmp_path / 'enc'}/*.tar"))
    assert check_encoded_data(cfg, str(tiny_vae))["samples"] == 10
    torch.manual_seed(1)
    other = tmp_path / "other-vae"
    VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).save_pretrained(other)
    with pytest.raises(UserError, match=r"encoded by the image tokenizer .*but the model's is "
                                        r".*other-vae"):
        check_encoded_data(cfg, str(other))
    images = OmegaConf.structured(DataConfig(source="shards", shards=image_shards))
    assert check_encoded_data(images, str(other)) is None  # images: any tokenizer
    with pytest.raises(UserError, match="already holds shards"):
        encode_dataset(tmp_path / "enc", str(tiny_vae), shards=image_shards)
    with pytest.raises(UserError, match="encoded already"):
        encode_dataset(tmp_path / "again", str(tiny_vae), shards=f"{tmp_path / 'enc'}/*.tar")
