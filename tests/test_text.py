import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fusion.config import resolve_path
from fusion.data.documents import CaptionDocuments, Image, Text, edit_document
from fusion.data.shapes import ShapesWorld
from fusion.data.sources import ShapesSource
from fusion.data.text import SPECIAL_TOKENS, TextTokenizer


def test_special_tokens_take_the_first_ids(tokenizer):
    assert [tokenizer.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(set(tokenizer.sentinel_ids())) == 8
    assert tokenizer.pad_id == 0 and tokenizer.boi_id != tokenizer.eoi_id


def test_bpe_save_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok")
    loaded = TextTokenizer.from_file(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.special_ids == tokenizer.special_ids
    for text in ["a photo of an orange star left of a blue circle", "make the red circle blue",
                 "Unseen words, digits 123 and ünïcödé ✓"]:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == text  # byte-level BPE is lossless


def test_shapes_text_is_compact(tokenizer):
    # every ShapesWorld word is a single token once the BPE is trained on the ShapesWorld corpus
    text = "a photo of a red circle and a blue square"
    assert len(tokenizer.encode(text)) == len(text.split())


def test_shipped_tokenizer_loads():
    tok = TextTokenizer.from_file(resolve_path("tokenizers/shapes-bpe"))
    sample = ShapesWorld(seed=0).sample(0)
    for caption in sample.captions.values():
        assert tok.decode(tok.encode(caption)) == caption


def test_user_tokenizer_without_specials_gets_them(tmp_path, caplog):
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path)
    assert all(tok.special_ids[t] is not None for t in SPECIAL_TOKENS)
    assert "lacks" in caplog.text


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TextTokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size must be"):
        TextTokenizer.train(["a b"], vocab_size=100)


def test_documents_follow_the_order_ratio(tokenizer):
    docs = CaptionDocuments(ShapesSource(400), tokenizer, image_first_ratio=0.2, seed=0)
    orders = [docs[i].order for i in range(400)]
    share = orders.count("image_first") / 400
    assert 0.14 < share < 0.26
    assert set(orders) == {"caption_first", "image_first"}
    doc = docs[0]
    assert doc.images[0].pixels.shape == (3, 64, 64)
    assert tokenizer.decode(doc.texts[0].ids) == doc.texts[0].text
    assert [docs[i].order for i in range(20)] == orders[:20]  # deterministic
    # image -> caption documents carry the full description (colours and classes)
    source = ShapesSource(400)
    for i in range(400):
        if orders[i] == "image_first":
            assert docs[i].texts[0].text == source[i].description
    assert all(d.order == "caption_first" for d in
               (CaptionDocuments(ShapesSource(20), tokenizer, 0.0)[i] for i in range(20)))
    with pytest.raises(ValueError, match="image_first_ratio"):
        CaptionDocuments(ShapesSource(2), tokenizer, image_first_ratio=1.5)


def test_edit_documents_interleave(tokenizer):
    import torch

    doc = edit_document(tokenizer, torch.zeros(3, 8, 8), "make the red circle blue",
                        torch.ones(3, 8, 8))
    assert [type(s) for s in doc.segments] == [Image, Text, Image]
    assert doc.segments[0].is_condition and not doc.segments[2].is_condition
    assert doc.order == "interleaved"
