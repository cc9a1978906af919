"""A family is one registered spec (fusion.families.registry): a third one is added here, in
this file alone, and the shared machinery -- config schema, build and image-tokenizer check,
the data's length check, training, model folders, sampling -- works with it unchanged."""

import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch import nn

import fusion.families as families
from fusion.config import DataConfig, OptimConfig, to_dataclass
from fusion.data.datamodule import DocumentDataModule
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.families.folders import load_model, save_model
from fusion.sampling.base import FamilySampler
from fusion.training.fusion_module import FusionModule

SHAPES_BPE = str(Path(__file__).resolve().parents[1] / "tokenizers/shapes-bpe/tokenizer.json")


@dataclass
class BagArch:
    width: int = 16
    max_seq_len: int = 48


@dataclass
class BagConfig:
    family: str = "bag"
    arch: BagArch = field(default_factory=BagArch)


class BagModel(nn.Module):
    """Predicts each next text token from the mean VAE latent of the document's image and the
    current token: the smallest model that reads both modalities."""

    def __init__(self, arch: BagArch, vocab_size: int, latent_channels: int):
        super().__init__()
        self.vocab_size, self.max_seq_len = vocab_size, arch.max_seq_len
        self.embed = nn.Embedding(vocab_size, arch.width)
        self.image = nn.Linear(latent_channels, arch.width)
        self.head = nn.Linear(arch.width, vocab_size)

    def forward(self, ids: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        image = self.image(latents.mean(dim=(-1, -2)))[:, None]  # (B, 1, W)
        return self.head(torch.tanh(self.embed(ids) + image))  # (B, S, V)


class BagLoss:
    def __init__(self, pad: int):
        self.pad = pad

    def text_budget(self, model: BagModel, n_images: int) -> int:
        return model.max_seq_len - 1

    def __call__(self, model, docs, encode, rng, generator=None):
        ids = [list(d.texts[0].ids) + [self.pad] for d in docs]
        width = max(map(len, ids))
        ids = torch.tensor([i + [self.pad] * (width - len(i)) for i in ids])
        latents = encode(torch.stack([d.images[0].pixels for d in docs]))
        logits = model(ids[:, :-1], latents)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                           ignore_index=self.pad)
        return {"loss": loss}


class BagSampler:
    def __init__(self, model, image_tokenizer):
        self.model, self.image_tokenizer = model.eval(), image_tokenizer

    def prompt_budget(self, task, max_new_tokens=0):
        raise NotImplementedError

    def generate_images(self, prompts, **settings):
        raise NotImplementedError("a bag of words draws no images")

    def caption(self, images, max_new_tokens=24, **settings):
        latents = self.image_tokenizer.encode(images)
        ids = torch.full((len(images), 1), 1)
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, self.model(ids, latents)[:, -1:].argmax(-1)], dim=1)
        return ids[:, 1:].tolist()

    def generate_text(self, prompts, max_new_tokens=24, **settings):
        raise NotImplementedError

    def edit(self, sources, instructions, **settings):
        raise NotImplementedError

    def generate_interleaved(self, prompts, max_new_tokens=96, max_images=4, **settings):
        raise NotImplementedError


def build(model_cfg, tokenizer, image_tokenizer, image_size):
    cfg = to_dataclass(model_cfg, BagConfig)
    model = BagModel(cfg.arch, tokenizer.vocab_size, image_tokenizer.latent_channels)
    return model, BagLoss(tokenizer.pad_id)


@pytest.fixture
def bag():
    family = families.register(families.Family(
        name="bag", model_class=BagModel, schema=BagConfig, image_tokenizer_kind="vae",
        default_image_tokenizer="tokenizers/shapes-vae", build=build,
        sampler=lambda model, loss, tok, itok, use_cache=True: BagSampler(model, itok)))
    yield family
    families.registry._FAMILIES.pop("bag")


def test_a_third_family_trains_saves_loads_and_samples_through_the_shared_code(
        bag, tiny_vae, tmp_path):
    assert "bag" in families.names()
    assert ConfigStore.instance().repo["model"]["bag_schema.yaml"].node.family == "bag"
    tok = TextTokenizer.from_file(SHAPES_BPE)
    image_tok = families.load_image_tokenizer(tiny_vae)
    cfg = OmegaConf.structured(BagConfig)
    model, loss = families.build_family(cfg, tok, image_tok, 64)
    assert families.family_of(model) is bag

    # the data checks records against the new family's text budget
    data = DocumentDataModule(DataConfig(num_train=8, num_val=4, batch_size=8), tok, text_budget=lambda n: loss.text_budget(model, n))
    data.setup()
    batch = [data.train_set[i] for i in range(8)]

    # the shared LightningModule trains it: the loss falls on one repeated batch
    module = FusionModule(model, loss, image_tok, OptimConfig(lr=3e-2, warmup_steps=1),
                          max_steps=60)
    first = float(loss(model, batch, module.encode, random.Random(0))["loss"])
    trainer = L.Trainer(max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 60, batch_size=None))
    last = float(loss(model, batch, module.encode, random.Random(0))["loss"])
    assert last < 0.5 * first

    # model folders and the sampler lookup are family-agnostic
    folder = save_model(tmp_path / "model", model, cfg, SHAPES_BPE, str(tiny_vae),
                        extra={"image_size": 64})
    loaded, _, tok2, itok2, meta = load_model(folder)
    assert meta["model"]["family"] == "bag" and isinstance(loaded, BagModel)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sampler = families.family_sampler(loaded, None, tok2, itok2)
    assert isinstance(sampler, FamilySampler)
    pixels = torch.stack([d.images[0].pixels for d in batch[:2]])
    assert len(sampler.caption(pixels, max_new_tokens=3)[0]) == 3


def test_the_registry_checks_the_image_tokenizer_kind_of_any_family(bag, tiny_vae):
    vq_like = type("VQ", (), {"codebook_size": 8, "artifact_path": "some/vq"})()
    with pytest.raises(UserError, match="the bag family needs a VAE image tokenizer .* "
                                        "image_tokenizer=some/vq is a VQ-GAN"):
        families.build_family(OmegaConf.structured(BagConfig), None, vq_like, 64)
    with pytest.raises(UserError, match="unknown model family 'sack'"):
        families.build_family(OmegaConf.create({"family": "sack"}), None, None, 64)


def test_both_built_in_samplers_meet_the_protocol():
    from fusion.sampling.chameleon import ChameleonSampler
    from fusion.sampling.transfusion import TransfusionSampler

    for cls in (TransfusionSampler, ChameleonSampler):
        missing = [m for m in ("prompt_budget", "generate_images", "caption", "generate_text",
                               "edit") if not callable(getattr(cls, m, None))]
        assert missing == [], cls
