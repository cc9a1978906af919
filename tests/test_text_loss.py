"""fusion.eval.text_loss: the held-out text loss the compute study compares the families on."""

import math
from pathlib import Path

import pytest
import torch

from fusion.config import compose
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.eval.text_loss import HELDOUT_TEXT_START, heldout_captions, heldout_text_loss
from fusion.families import build_family, load_image_tokenizer
from fusion.models.attention import AttentionLayout
from fusion.models.packing import SpecialIds, pack

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _family(name: str, image_tokenizer: str, *overrides: str):
    torch.manual_seed(0)
    cfg = compose("train", [f"experiment={name}_tiny", *overrides])
    tok = TextTokenizer.from_file(ROOT / cfg.data.text_tokenizer)
    model, loss = build_family(cfg.model, tok, load_image_tokenizer(image_tokenizer), 64)
    return model, loss, tok


@pytest.fixture(scope="module")
def transfusion(tiny_vae):
    return _family("transfusion", str(tiny_vae))


@pytest.fixture(scope="module")
def chameleon():
    return _family("chameleon", "tokenizers/shapes-vqgan")


def test_captions_are_held_out_and_drawn_as_training_draws_them():
    from fusion.data.sources import ShapesSource

    assert HELDOUT_TEXT_START > compose("train", ["experiment=transfusion_tiny"]).data.num_train
    source = ShapesSource(5, offset=HELDOUT_TEXT_START)
    assert heldout_captions(5) == [source[i].caption for i in range(5)]


def _by_hand(model, tok, n: int) -> tuple[float, int]:
    """Each caption alone: the model's logits at <bos> and the caption predict the caption."""
    special = SpecialIds.from_tokenizer(tok)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for caption in heldout_captions(n):
            ids = [special.bos, *tok.encode(caption)]
            packed = pack([[ids]], len(ids), special.pad)
            logits = model.text_logits(packed.ids, AttentionLayout(packed.doc_ids,
                                                                   packed.image_ids))
            total += float(torch.nn.functional.cross_entropy(
                logits[0, :-1], torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    model.train()
    return total / count, count


@pytest.mark.parametrize("which", ["transfusion", "chameleon"])
def test_text_loss_is_the_caption_tokens_cross_entropy_whatever_the_batching(which, request):
    model, _, tok = request.getfixturevalue(which)
    expected, count = _by_hand(model, tok, 12)
    for batch_size in (12, 5):  # several captions share a packed row; unequal batches
        got = heldout_text_loss(model, tok, 12, batch_size=batch_size)
        assert got["text_loss"] == pytest.approx(expected, rel=1e-5)
        assert got["text_loss_tokens"] == count  # every caption token, nothing after it
    assert got["text_perplexity"] == pytest.approx(math.exp(got["text_loss"]))
    assert abs(got["text_loss"] - math.log(model.vocab_size)) < 1.0  # untrained: near uniform
    assert model.training  # left as it was found


def test_text_logits_are_the_training_forwards_logits(transfusion, chameleon):
    """text_logits is each family's ordinary forward on a batch without images."""
    special = SpecialIds.from_tokenizer(transfusion[2])
    ids = [special.bos, *transfusion[2].encode("a photo of a red circle")]
    packed = pack([[ids]], len(ids), special.pad)
    layout = AttentionLayout(packed.doc_ids, packed.image_ids)
    model = transfusion[0]
    assert torch.equal(model.text_logits(packed.ids, layout), model(packed.ids, layout)[1])
    model = chameleon[0]
    assert torch.equal(model.text_logits(packed.ids, layout), model(packed.ids, layout))


def test_a_chameleon_with_image_positions_is_scored_too():
    model, _, tok = _family("chameleon", "tokenizers/shapes-vqgan",
                            "model.arch.image_pos_embed=true")
    assert math.isfinite(heldout_text_loss(model, tok, 4)["text_loss"])


def test_text_loss_refuses_no_documents_and_models_without_text_logits(transfusion):
    model, _, tok = transfusion
    with pytest.raises(UserError, match="at least one document"):
        heldout_text_loss(model, tok, 0)
    with pytest.raises(UserError, match="Linear has no text_logits"):
        heldout_text_loss(torch.nn.Linear(2, 2), tok, 4)
