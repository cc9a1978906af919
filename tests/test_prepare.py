"""Batches prepared in loader workers (fusion.models.packing.PreparedBatch): the same batches
and losses as preparing in the training process, draws seeded by the batch's place in the
data, Chameleon's code placeholders, and the stacked images."""

import random

import pytest
import torch
from omegaconf import OmegaConf

from fusion.config import DataConfig, compose
from fusion.data.datamodule import DocumentDataModule, NumberedBatches, ResumableSampler
from fusion.data.documents import Image, ImageBatch
from fusion.families import build_family, load_image_tokenizer
from fusion.models.chameleon import CODE_SLOT, code_slots, fill_codes, image_cells, slot_cells
from fusion.models.cm3 import cm3_invert
from fusion.models.packing import PreparedBatch


def _family(name: str, tokenizer, **loss):
    cfg = compose("train", [f"experiment={name}_tiny"])
    image_tok = load_image_tokenizer(cfg.image_tokenizer)
    for key, value in loss.items():
        cfg.model.loss[key] = value
    torch.manual_seed(0)
    model, loss_fn = build_family(cfg.model, tokenizer, image_tok, cfg.data.image_size)
    return model, loss_fn, image_tok


def _data(tokenizer, prepare=None, workers=0, batch=4, **kw) -> DocumentDataModule:
    cfg = OmegaConf.structured(DataConfig(num_train=24, num_val=8, batch_size=batch,
                                          num_workers=workers, **kw))
    data = DocumentDataModule(cfg, tokenizer, prepare=prepare)
    data.setup()
    return data


def _same(a: PreparedBatch, b: PreparedBatch) -> bool:
    tensors = [(a.packed.ids, b.packed.ids), (a.packed.doc_ids, b.packed.doc_ids),
               (a.packed.image_ids, b.packed.image_ids), (a.images.pixels, b.images.pixels)]
    return (all(torch.equal(x, y) for x, y in tensors) and a.extras.keys() == b.extras.keys()
            and all(torch.equal(a.extras[k], b.extras[k]) if isinstance(a.extras[k], torch.Tensor)
                    else a.extras[k] == b.extras[k] for k in a.extras))


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_worker_prepared_batches_equal_the_in_process_ones_and_give_the_same_loss(
        family, tokenizer):
    model, loss, image_tok = _family(family, tokenizer, **(
        {"cm3": True, "cm3_rate": 1.0} if family == "chameleon" else {"clean_image_share": 0.5}))
    inline = list(_data(tokenizer, loss.preparer(model)).train_dataloader())
    workers = list(_data(tokenizer, loss.preparer(model), workers=2).train_dataloader())
    assert len(inline) == len(workers) == 6
    assert all(isinstance(b, PreparedBatch) and len(b) == 4 for b in workers)
    assert all(_same(a, b) for a, b in zip(inline, workers, strict=True))
    # the prepared batch's loss is the loss of its documents prepared with the same draws
    docs = _data(tokenizer).train_dataloader()
    first_docs = next(iter(docs))
    key_rng = random.Random("/".join(map(str, (0, 0, 0))))  # seed / epoch / batch number
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        direct = loss(model, first_docs, image_tok.encode, key_rng, generator=g())
        prepared = loss.compute(model, workers[0], image_tok.encode, generator=g())
    assert torch.equal(direct["loss"], prepared["loss"])


def test_batch_draws_follow_the_batch_key_so_a_resumed_epoch_draws_the_same():
    sampler = ResumableSampler(20, seed=3)
    full = list(NumberedBatches(sampler, 4, drop_last=True))
    assert [b[0][:2] for b in full] == [(0, k) for k in range(5)]
    assert [i for b in full for *_, i in b] == sampler.order(0)
    sampler.resume_at(0, 8)  # two batches of epoch 0 already trained
    assert list(NumberedBatches(sampler, 4, drop_last=True)) == full[2:]
    sampler.set_epoch(1)
    assert [b[0][:2] for b in NumberedBatches(sampler, 4, drop_last=True)] == [
        (1, k) for k in range(5)]


def test_caption_dropout_draws_differ_between_batches_and_epochs(tokenizer):
    model, loss, _ = _family("transfusion", tokenizer, caption_dropout=0.5)
    data = _data(tokenizer, loss.preparer(model), batch=8)
    loader = data.train_dataloader()
    kept = []  # per epoch, per batch: which documents kept their caption
    for epoch in range(2):
        data.train_sampler.set_epoch(epoch)
        # a dropped caption leaves 4 text positions: <bos> <boi> <eoi> <eos>
        kept.append([tuple(int((b.packed.is_text & (b.packed.doc_ids == d)).sum()) > 4
                           for d in range(len(b))) for b in loader])
    flags = [k for epoch in kept for batch in epoch for k in batch]
    assert 0.2 < sum(flags) / len(flags) < 0.8  # about half dropped, as configured
    assert len(set(kept[0])) > 1 and kept[0] != kept[1]  # not one draw for every batch


def test_chameleon_placeholders_fill_to_the_documents_codes(tokenizer):
    """CM3 moves placeholders with their spans; filled and un-CM3'd, each document is its
    <bos> body <eos> with the VQ-GAN's codes, and every code's cell is its grid cell."""
    model, loss, image_tok = _family("chameleon", tokenizer, cm3=True, cm3_rate=1.0,
                                     caption_dropout=0.0)
    docs = next(iter(_data(tokenizer, batch=6).train_dataloader()))
    batch = loss.prepare(docs, random.Random(5), loss.rows(model))
    assert (batch.packed.ids <= CODE_SLOT).sum() == 6 * model.codes_per_image
    codes = image_tok.encode(torch.stack([d.images[0].pixels for d in docs]))  # (6, h, w)
    ids = fill_codes(batch.packed.ids, codes.flatten() + model.text_vocab)
    cells = slot_cells(batch.packed.ids, model.codes_per_image)
    s, moved = loss.special, 0
    for d, doc in enumerate(docs):
        where = batch.packed.doc_ids == d
        row, row_cells = ids[where].tolist(), cells[where]
        assert (row[0], row[-1]) == (s.bos, s.eos)
        body = cm3_invert(row[1:-1], loss.cm3_tokens)
        moved += body != row[1:-1]
        assert body == loss.document_ids(doc, [codes[d].flatten().tolist()], model.text_vocab,
                                         drop_caption=False)
        # a code's cell is its index in its image, wherever CM3 moved it
        is_code = torch.tensor(row) >= model.text_vocab
        assert (row_cells[is_code] >= 0).all() and (row_cells[~is_code] == -1).all()
        in_place = image_cells(torch.tensor(body), s.boi, model.text_vocab)
        assert sorted(row_cells[is_code].tolist()) == sorted(in_place[in_place >= 0].tolist())
    assert moved  # CM3 at rate 1 moved spans in some document
    assert code_slots(1, 3) == [CODE_SLOT - 3, CODE_SLOT - 4, CODE_SLOT - 5]
    with pytest.raises(ValueError, match="placeholders without encoded images"):
        fill_codes(batch.packed.ids, None)


def test_image_batch_keeps_the_order_of_fresh_and_pre_encoded_images():
    pixels = [torch.full((3, 4, 4), float(i)) for i in range(4)]
    stored = torch.full((2, 2), 7)
    images = [Image(pixels[0]), Image(stored, pre_encoded=True), Image(pixels[2]),
              Image(stored + 1, pre_encoded=True)]
    batch = ImageBatch.of(images)
    encode = lambda px: px[:, 0, :2, :2].long() * 10  # noqa: E731  (F, 2, 2)
    out = batch.encode(encode, "cpu")
    assert out.dtype == torch.long
    assert [int(x[0, 0]) for x in out] == [0, 7, 20, 8]
    assert torch.equal(batch.pixels_of([2]), pixels[2][None])
    with pytest.raises(ValueError, match="pre-encoded"):
        batch.pixels_of([1])


def test_a_bad_prefetch_factor_is_refused(tokenizer):
    with pytest.raises(ValueError, match="prefetch_factor"):
        _data(tokenizer, workers=1, prefetch_factor=0)


def test_a_chameleon_model_with_another_code_grid_is_refused(tokenizer):
    model, loss, image_tok = _family("chameleon", tokenizer)
    docs = next(iter(_data(tokenizer).train_dataloader()))
    batch = loss.prepare(docs, random.Random(0), loss.rows(model))
    model.codes_per_image = 4  # a model built for another tokenizer's grid
    with pytest.raises(ValueError, match="codes per image"):
        loss.compute(model, batch, image_tok.encode)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_prepared_batches_train_on_cuda(tokenizer):
    model, loss, image_tok = _family("transfusion", tokenizer)
    batch = next(iter(_data(tokenizer, loss.preparer(model)).train_dataloader())).pin_memory()
    assert batch.packed.ids.is_pinned() and batch.images.pixels.is_pinned()
    model, image_tok = model.cuda(), image_tok.cuda()
    out = loss.compute(model, batch, image_tok.encode, torch.Generator("cuda").manual_seed(0))
    assert torch.isfinite(out["loss"])
