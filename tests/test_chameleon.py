"""Chameleon family: image-code restriction, CFG, cache equivalence, overfitting."""

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion.data.documents import Document, Image, Text
from fusion.models.attention import AttentionLayout
from fusion.models.chameleon import Chameleon, ChameleonLoss, image_cells
from fusion.models.cm3 import CM3Tokens
from fusion.models.packing import SpecialIds
from fusion.models.schemas import ChameleonConfig, ChameleonLossConfig
from fusion.sampling.chameleon import ChameleonSampler
from fusion.sampling.text import TokenSampling

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
TOKENS = CM3Tokens(sentinels=tuple(range(6, 14)), eoss=5)
TEXT_VOCAB, CODEBOOK = 40, 16


def encode(pixels):
    """A stand-in for the VQ-GAN: (I, 3, 8, 8) -> codes (I, 2, 2) in [0, 16)."""
    x = F.avg_pool2d(pixels.mean(1, keepdim=True), 4)[:, 0]
    return ((x + 1) / 2 * CODEBOOK).long().clamp(0, CODEBOOK - 1)


def make(seed=0, image_pos_embed=False, **loss_kw):
    torch.manual_seed(seed)
    model = Chameleon(ChameleonConfig(backbone_overrides=dict(
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, multiple_of=32),
        image_pos_embed=image_pos_embed), TEXT_VOCAB, CODEBOOK, codes_per_image=4)
    return model, ChameleonLoss(ChameleonLossConfig(**loss_kw), SPECIAL, TOKENS)


def docs(n=4, seed=0, image_first=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = Image(torch.rand(3, 8, 8, generator=g) * 2 - 1)
        text = Text(tuple(int(x) for x in torch.randint(14, TEXT_VOCAB, (4,), generator=g)))
        out.append(Document((img, text) if image_first else (text, img)))
    return out


def test_image_positions_only_sample_image_codes_and_eoi_is_forced():
    model, _ = make()
    # bias the head hard towards a text token: the restriction must still hold
    with torch.no_grad():
        model.lm_head.weight[20] += 5.0
    s = ChameleonSampler(model, SPECIAL, (2, 2))
    codes = s.generate_images([[20, 21], [22]], guidance_scale=None, seed=0,
                              sampling=TokenSampling(temperature=2.0))
    assert codes.shape == (2, 2, 2)
    assert codes.min() >= 0 and codes.max() < CODEBOOK


@pytest.mark.parametrize("image_pos_embed", [False, True])
def test_cached_and_uncached_sampling_give_the_same_tokens(image_pos_embed):
    model, _ = make(image_pos_embed=image_pos_embed)
    out = []
    for use_cache in (True, False):
        s = ChameleonSampler(model, SPECIAL, (2, 2), use_cache=use_cache)
        out.append(s.generate_images([[20, 21, 22], [23]], guidance_scale=2.0, seed=5))
        out.append(s.generate_text([[20, 21], [22]], max_new_tokens=6,
                                   sampling=TokenSampling(1.0, top_k=10), seed=1))
    assert torch.equal(out[0], out[2])
    assert out[1] == out[3]


def test_guidance_scale_one_equals_unguided():
    model, _ = make()
    s = ChameleonSampler(model, SPECIAL, (2, 2))
    a = s.generate_images([[20, 21, 22], [23]], guidance_scale=1.0, seed=4)
    b = s.generate_images([[20, 21, 22], [23]], guidance_scale=None, seed=4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("tempt", ["image code", "sentinel", "eoss", "bos"])
def test_captions_contain_no_image_codes_nor_control_tokens(tempt):
    """Captions and text continuations never hold an image code, <boi>/<eoi>/<pad>, <bos>,
    a CM3 sentinel or <eoss>, however strongly the model prefers one."""
    model, _ = make()
    special = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, cm3=(*TOKENS.sentinels, TOKENS.eoss))
    token = {"image code": TEXT_VOCAB + 3, "sentinel": TOKENS.sentinels[2], "eoss": TOKENS.eoss,
             "bos": special.bos}[tempt]
    with torch.no_grad():
        model.lm_head.weight[token] += 5.0  # tempt it
    s = ChameleonSampler(model, special, (2, 2), encode_images=encode)
    caps = s.caption(torch.rand(3, 3, 8, 8) * 2 - 1, max_new_tokens=6,
                     sampling=TokenSampling(1.0))
    caps += s.generate_text([[20, 21], [22]], max_new_tokens=6, sampling=TokenSampling(1.0))
    forbidden = {0, 1, 3, 4, *special.cm3}
    assert all(0 <= t < TEXT_VOCAB and t not in forbidden for c in caps for t in c), caps
    assert sum(len(c) for c in caps) > 0


def test_special_ids_from_the_tokenizer_hold_the_cm3_tokens():
    from fusion.data.text import TextTokenizer

    tok = TextTokenizer.from_file(Path(__file__).resolve().parents[1] / "tokenizers/shapes-bpe")
    special = SpecialIds.from_tokenizer(tok)
    assert special.cm3 == (*tok.sentinel_ids(), tok.eoss_id) and len(special.cm3) == 9


@pytest.mark.parametrize("image_pos_embed", [False, True])
def test_tiny_model_overfits_one_batch(image_pos_embed):
    model, loss = make(image_pos_embed=image_pos_embed, cm3=False, caption_dropout=0.0,
                       z_loss_weight=1e-5)
    batch = docs(4, image_first=True)  # every target determined by its context
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(100):
        out = loss(model, batch, encode, random.Random(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    # <bos> -> <boi> and the first code of each image are the only uncertain targets:
    # 4 docs share <bos> <boi>, so the floor is the entropy of their first codes / targets.
    assert out["lm_loss"].item() < 0.2, out["lm_loss"]
    assert "z_loss" in out and out["z_loss"].item() > 0


def test_configured_top_k_reaches_the_image_codes(monkeypatch):
    """sampling.top_k (chameleon_tiny.yaml sets it) reaches the code sampler through the grid's
    make_image_sampler: top_k=1 leaves one candidate per code, so the images are the greedy
    ones whatever the seed, while the default settings (full softmax) depend on the seed."""
    from types import SimpleNamespace

    import fusion.training.samplers as samplers
    from fusion.config import SamplingConfig

    model, _ = make()
    monkeypatch.setattr(samplers, "family_sampler",
                        lambda *a, **k: ChameleonSampler(model, SPECIAL, (2, 2)))
    tok = SimpleNamespace(encode=lambda text: [14 + len(text) % 20, 15])
    prompts = ["a red circle", "two blue squares"]

    def images(**sampling):
        cfg = SimpleNamespace(sampling=SamplingConfig(guidance_scale=2.0, **sampling))
        return samplers.make_image_sampler(cfg, tok, None, None)(model)(prompts)

    top1 = [images(top_k=1, seed=seed) for seed in range(4)]
    assert all(torch.equal(top1[0], x) for x in top1[1:])
    assert torch.equal(top1[0], images(temperature=0.0))
    full = [images(seed=seed) for seed in range(4)]
    assert any(not torch.equal(full[0], x) for x in full[1:])


def test_pack_len_changes_the_rows_not_the_loss():
    batch = docs(6)  # 12 positions each before CM3 (4 text, 4 codes, 4 specials)
    losses, rows = [], []
    for pack_len in (None, 24):
        model, loss = make(pack_len=pack_len, cm3=True, cm3_rate=1.0)
        model.register_forward_pre_hook(lambda m, args: rows.append(tuple(args[0].shape)))
        losses.append(loss(model, batch, encode, random.Random(0)))
    assert rows[0][1] == 96 and rows[1][1] == 24 and rows[1][0] > rows[0][0]
    for part in ("loss", "lm_loss", "z_loss"):
        torch.testing.assert_close(losses[1][part], losses[0][part], atol=1e-5, rtol=1e-5)


def test_image_cells_count_codes_from_the_latest_boi():
    b, i, e, p = SPECIAL.bos, SPECIAL.boi, SPECIAL.eoi, SPECIAL.pad
    c = TEXT_VOCAB  # first image code
    ids = torch.tensor([[p, b, 20, i, c, c + 5, c, c + 1, e, 21, i, c + 2, c + 2, e, SPECIAL.eos]])
    want = [-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, 0, 1, -1, -1]
    assert image_cells(ids, SPECIAL.boi, TEXT_VOCAB).tolist() == [want]


def test_cells_travel_with_cm3_spans():
    """Every image has codes 0, 1, 2, 3 in its cells 0..3, so after CM3 has moved spans (out of
    images, across captions, to the end) a code's cell must still equal the code."""
    def distinct(pixels):
        return torch.arange(CODEBOOK)[:4].view(1, 2, 2).repeat(len(pixels), 1, 1)

    model, loss = make(image_pos_embed=True, cm3=True, cm3_rate=1.0, cm3_lambda=3.0)
    moved = 0
    for seed in range(40):
        for pieces, cells in loss.documents_with_cells(model, docs(3, seed), distinct,
                                                       random.Random(seed)):
            ids = [t for p in pieces for t in p]
            assert len(cells) == len(ids)
            for t, cell in zip(ids, cells, strict=True):
                assert cell == (t - TEXT_VOCAB if t >= TEXT_VOCAB else -1)
            codes = [k for k, t in enumerate(ids) if t >= TEXT_VOCAB]
            moved += codes != list(range(codes[0], codes[0] + 4))  # not one in-place run
    assert moved > 10  # the check above met codes that CM3 moved


def test_image_pos_embed_needs_cells_and_uses_them():
    model, _ = make(image_pos_embed=True)
    ids = torch.tensor([[SPECIAL.bos, 20, SPECIAL.boi] + [TEXT_VOCAB + 1] * 4 + [SPECIAL.eoi]])
    layout = AttentionLayout(torch.zeros_like(ids), torch.full_like(ids, -1))
    with pytest.raises(ValueError, match="image_pos_embed"):
        model(ids, layout)
    cells = image_cells(ids, SPECIAL.boi, TEXT_VOCAB)
    reversed_cells = cells.clone()
    reversed_cells[cells >= 0] = torch.tensor([3, 2, 1, 0])  # the same codes, other cells
    with torch.no_grad():
        a = model(ids, layout, cells=cells)
        b = model(ids, layout, cells=reversed_cells)
    same = model.embed(ids)
    assert not torch.allclose(a, b)
    assert not torch.allclose(model.embed_tokens(ids, cells), same)
    plain, _ = make(image_pos_embed=False)
    assert plain.image_pos is None and torch.equal(plain.embed_tokens(ids), plain.embed(ids))


def test_sampled_codes_are_the_full_pass_argmax_with_image_cells():
    """Greedy codes drawn one at a time (each with the loop's cell) are the argmax of one
    full teacher-forced pass whose cells come from image_cells: sampling and training place
    the 2-D embedding on the same cells."""
    model, _ = make(image_pos_embed=True)
    with torch.no_grad():
        model.image_pos.row.normal_(0, 1.0)  # make the cells matter to the argmax
        model.image_pos.col.normal_(0, 1.0)
    s = ChameleonSampler(model, SPECIAL, (2, 2))
    prompt = [20, 21, 22]
    codes = s.generate_images([prompt], guidance_scale=None,
                              sampling=TokenSampling(temperature=0.0))[0].flatten()
    seq = torch.tensor([[SPECIAL.bos, *prompt, SPECIAL.boi, *(codes + TEXT_VOCAB).tolist()]])
    layout = AttentionLayout(torch.zeros_like(seq), torch.full_like(seq, -1))
    with torch.no_grad():
        logits = model(seq, layout, cells=image_cells(seq, SPECIAL.boi, TEXT_VOCAB))
    start = len(prompt) + 1  # the <boi> position predicts the first code
    greedy = logits[0, start:start + 4, TEXT_VOCAB:].argmax(-1)
    assert torch.equal(greedy, codes)
