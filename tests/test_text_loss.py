"""fusion.eval.text_loss: the held-out text loss the compute study compares the families on."""

import math
from pathlib import Path

import pytest
import torch

from fusion.config import compose
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.eval.text_loss import HELDOUT_TEXT_START, caption_documents, heldout_text_loss
from fusion.families import build_family, load_image_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _family(name: str, image_tokenizer: str):
    torch.manual_seed(0)
    cfg = compose("train", [f"experiment={name}_tiny"])
    tok = TextTokenizer.from_file(ROOT / cfg.data.text_tokenizer)
    model, loss = build_family(cfg.model, tok, load_image_tokenizer(image_tokenizer), 64)
    return model, loss, tok


@pytest.fixture(scope="module")
def transfusion(tiny_vae):
    return _family("transfusion", str(tiny_vae))


@pytest.fixture(scope="module")
def chameleon():
    return _family("chameleon", "tokenizers/shapes-vqgan")


def test_documents_are_held_out_captions_as_training_draws_them():
    from fusion.data.sources import ShapesSource

    tok = TextTokenizer.from_file(ROOT / "tokenizers/shapes-bpe/tokenizer.json")
    docs = caption_documents(tok, 5)
    assert HELDOUT_TEXT_START > compose("train", ["experiment=transfusion_tiny"]).data.num_train
    source = ShapesSource(5, offset=HELDOUT_TEXT_START)
    for i, doc in enumerate(docs):
        (text,) = doc.segments  # caption only: no image
        assert text.text == source[i].caption and list(text.ids) == tok.encode(text.text)


@pytest.mark.parametrize("which", ["transfusion", "chameleon"])
def test_text_loss_is_the_token_weighted_mean_whatever_the_batching(which, request):
    model, loss, tok = request.getfixturevalue(which)
    whole = heldout_text_loss(model, loss, tok, 24, batch_size=24)
    split = heldout_text_loss(model, loss, tok, 24, batch_size=5)  # batches of unequal counts
    assert split["text_loss"] == pytest.approx(whole["text_loss"], rel=1e-5)
    # every caption token and <eos> is predicted once
    docs = caption_documents(tok, 24)
    assert whole["text_loss_tokens"] == sum(len(d.texts[0].ids) + 1 for d in docs)
    # an untrained model is near uniform over the vocabulary
    assert abs(whole["text_loss"] - math.log(model.vocab_size)) < 1.0
    assert whole["text_perplexity"] == pytest.approx(math.exp(whole["text_loss"]))
    assert model.training  # left as it was found


def test_text_loss_is_one_documents_cross_entropy(transfusion):
    """One document scored by hand: the model's logits at <bos> and the caption predict the
    caption and <eos>."""
    model, loss, tok = transfusion
    (doc,) = caption_documents(tok, 1)
    ids = [loss.special.bos, *doc.texts[0].ids, loss.special.eos]
    from fusion.models.attention import AttentionLayout
    from fusion.models.packing import pack

    packed = pack([[ids]], len(ids), loss.special.pad)
    model.eval()
    with torch.no_grad():
        _, logits, _ = model(packed.ids, AttentionLayout(packed.doc_ids, packed.image_ids),
                             packed, None, None)
    model.train()
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]))
    got = heldout_text_loss(model, loss, tok, 1)["text_loss"]
    assert got == pytest.approx(float(expected), rel=1e-5)


def test_chameleons_cm3_does_not_touch_the_scored_text(chameleon):
    import dataclasses

    model, loss, tok = chameleon
    always = dataclasses.replace(loss.cfg, cm3=True, cm3_rate=1.0)
    with_cm3 = type(loss)(always, loss.special, loss.cm3_tokens)
    assert heldout_text_loss(model, with_cm3, tok, 16)["text_loss"] == pytest.approx(
        heldout_text_loss(model, loss, tok, 16)["text_loss"], rel=1e-6)
    assert with_cm3.cfg.cm3  # the caller's loss is left as it was


def test_text_loss_refuses_no_documents(transfusion):
    model, loss, tok = transfusion
    with pytest.raises(UserError, match="at least one document"):
        heldout_text_loss(model, loss, tok, 0)
