import pytest
import torch

from fusion.models.attention import reference_mask
from fusion.models.packing import (
    ImageSlot,
    gather_images,
    pack,
    per_position,
    row_length,
    scatter_images,
)


def test_pack_first_fit_ids_and_modality_map():
    docs = [[[1, 5, 6], ImageSlot(4), [2]],  # 8 positions
            [[1, 7], [2]],  # 3
            [[1], ImageSlot(4), [9, 2]]]  # 7
    p = pack(docs, max_len=12, pad_id=0)
    assert p.ids.shape == (2, 12)
    # doc 0 and doc 1 share row 0 (8 + 3 <= 12); doc 2 opens row 1
    assert p.doc_ids[0].tolist() == [0] * 8 + [1] * 3 + [-1]
    assert p.doc_ids[1].tolist() == [2] * 7 + [-1] * 5
    assert p.image_ids[0].tolist() == [-1] * 3 + [0] * 4 + [-1] * 5
    assert p.image_ids[1].tolist() == [-1] + [1] * 4 + [-1] * 7
    assert (p.image_rows, p.image_starts, p.doc_of_image) == ([0, 1], [3, 1], [0, 2])
    assert p.ids[0, :3].tolist() == [1, 5, 6] and p.ids[0, 7].item() == 2


def test_next_token_targets_are_text_only_and_stay_in_the_document():
    docs = [[[1, 5], ImageSlot(3), [4, 8, 2]], [[1, 7, 2]]]
    p = pack(docs, max_len=16, pad_id=0)
    tgt = p.next_token_targets()[0].tolist()
    # positions: 0:1 1:5 2-4:img 5:4 6:8 7:2 | 8:1 9:7 10:2 | pad
    assert tgt[0] == 5
    assert tgt[1] == -100  # the next position is an image slot
    assert tgt[2:5] == [-100] * 3  # image positions predict nothing
    assert tgt[5:7] == [8, 2]
    assert tgt[7] == -100  # <eos> of doc 0 must not predict doc 1's <bos>
    assert tgt[8:10] == [7, 2] and tgt[10:] == [-100] * 6


def test_mask_from_packed_layout_matches_the_rule():
    docs = [[[1, 5], ImageSlot(3), [4, 2]], [[1, 7, 2]]]
    p = pack(docs, max_len=12, pad_id=0)
    mask = reference_mask(p.doc_ids, p.image_ids)[0]
    # image positions 2..4 see each other (bidirectional), text 1 does not see image 2
    assert mask[2, 4] and mask[4, 2] and not mask[1, 2]
    assert not mask[8, 3]  # doc 1 never sees doc 0


def test_scatter_gather_round_trip():
    docs = [[[1], ImageSlot(2), [2]], [[1], ImageSlot(2), [2]]]
    p = pack(docs, max_len=5, pad_id=0, one_per_row=True)
    hidden = torch.zeros(2, 5, 3)
    tokens = torch.arange(12.0).view(2, 2, 3)
    out = scatter_images(hidden, p, tokens)
    assert torch.equal(gather_images(out, p), tokens)
    assert out[:, 0].abs().sum() == 0 and out[:, 3].abs().sum() == 0


def test_pack_errors():
    with pytest.raises(ValueError, match="more than max_len=4"):
        pack([[[1, 2, 3], ImageSlot(2)]], max_len=4, pad_id=0)
    with pytest.raises(ValueError, match="at least one document"):
        pack([], max_len=4, pad_id=0)


def test_per_position_follows_each_document_to_its_row():
    docs = [[[1, 2, 3]], [[4, 5, 6, 7]], [[8]]]  # first fit puts the third into row 0
    packed = pack(docs, max_len=4, pad_id=0)
    values = [[10, 11, 12], [20, 21, 22, 23], [30]]
    out = per_position(values, packed, fill=-1)
    assert out.tolist() == [[10, 11, 12, 30], [20, 21, 22, 23]]
    with pytest.raises(ValueError, match="document 1: 3 values for 4 packed positions"):
        per_position([[10, 11, 12], [20, 21, 22], [30]], packed, fill=-1)


def test_image_slots_follow_document_order_when_first_fit_reorders():
    # Document 2 fits into row 0 after document 1 has opened row 1. Slots must still be
    # numbered by document (callers build latents in document order), not by row: slot order
    # by row paired images with the wrong captions (docs/results.md, the packing fix).
    docs = [[[1, 5], ImageSlot(3), [2, 2, 2]],  # 8 positions: row 0
            [[1], ImageSlot(3), [6, 6, 6]],  # 7: does not fit row 0 -> row 1
            [[1], ImageSlot(3)]]  # 4: fits row 0 (8 + 4 = 12)
    p = pack(docs, max_len=12, pad_id=0)
    assert p.doc_of_image == [0, 1, 2] and p.image_rows == [0, 1, 0]
    assert p.image_starts == [2, 1, 9]
    assert p.image_ids[0].tolist() == [-1, -1, 0, 0, 0, -1, -1, -1, -1, 2, 2, 2]
    assert p.image_ids[1].tolist() == [-1, 1, 1, 1] + [-1] * 8
    assert p.doc_ids[0].tolist() == [0] * 8 + [2] * 4
    tokens = torch.arange(1.0, 10.0).view(3, 3, 1)  # image i holds 3i+1 .. 3i+3
    hidden = scatter_images(torch.zeros(2, 12, 1), p, tokens)
    assert hidden[1, 1:4, 0].tolist() == [4, 5, 6]  # document 1's image lands in document 1
    assert hidden[0, 9:12, 0].tolist() == [7, 8, 9]
    assert torch.equal(gather_images(hidden, p), tokens)


def test_row_length_takes_pack_len_within_the_model_positions():
    assert row_length(None, 256) == 256
    assert row_length(64, 256) == 64 and row_length(256, 256) == 256
    for bad in (0, -3, 257):
        with pytest.raises(ValueError, match=f"loss.pack_len={bad} must be between 1 and the "
                                             "model's max_seq_len=256"):
            row_length(bad, 256)
    with pytest.raises(ValueError, match=r"raise the row length \(the model's max_seq_len, or "
                                         r"loss.pack_len\)"):
        pack([[[1, 2, 3], ImageSlot(2)]], max_len=4, pad_id=0)
