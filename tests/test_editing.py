"""Image editing (docs/editing.md): edit documents, objectives, init_from, sampling, scoring."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from fusion.data.documents import Document, Image, Text, drop_edit_conditions
from fusion.models.chameleon import Chameleon, ChameleonLoss
from fusion.models.cm3 import CM3Tokens
from fusion.models.packing import SpecialIds
from fusion.models.schemas import (
    ChameleonConfig,
    ChameleonLossConfig,
    TransfusionConfig,
    TransfusionLossConfig,
)
from fusion.models.transfusion import Transfusion, TransfusionLoss

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
TOKENS = CM3Tokens(sentinels=tuple(range(6, 14)), eoss=5)
VOCAB, CODEBOOK = 40, 16
INSTR = (20, 21, 22)  # an instruction's ids
SMALL = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, multiple_of=32)


# Tiny networks gain nothing from a second thread on a shared CPU (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# -- stand-ins for the frozen image tokenizers (as in test_transfusion / test_chameleon) ------
def vae_encode(pixels):
    """(I, 3, 16, 16) -> latents (I, 4, 8, 8)."""
    x = F.avg_pool2d(pixels, 2)
    return torch.cat([x, x[:, :1] * 0.5], 1)


def vq_encode(pixels):
    """(I, 3, 8, 8) -> codes (I, 2, 2) in [0, CODEBOOK)."""
    x = F.avg_pool2d(pixels.mean(1, keepdim=True), 4)[:, 0]
    return ((x + 1) / 2 * CODEBOOK).long().clamp(0, CODEBOOK - 1)


def transfusion(seed=0, **loss_kw):
    torch.manual_seed(seed)
    arch = TransfusionConfig(backbone_overrides=SMALL, patch_size=2, latent_channels=4,
                             latent_size=8)
    model = Transfusion(arch, VOCAB)
    with torch.no_grad():  # DiT-style zero-init outputs: give them weights to see gradients
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.05)
    return model, TransfusionLoss(TransfusionLossConfig(**loss_kw), SPECIAL)


def chameleon(seed=0, codes_per_image=4, **loss_kw):
    torch.manual_seed(seed)
    model = Chameleon(ChameleonConfig(backbone_overrides=SMALL), VOCAB, CODEBOOK,
                      codes_per_image=codes_per_image)
    return model, ChameleonLoss(ChameleonLossConfig(**loss_kw), SPECIAL, TOKENS)


def edit_docs(n=4, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src, tgt = (torch.rand(3, side, side, generator=g) * 2 - 1 for _ in range(2))
        out.append(Document((Image(src, is_condition=True), Text((20 + i, 30 + i, 31)),
                             Image(tgt))))
    return out


def target_positions(loss_fn, model, docs, encode, **kw):
    """Positions whose logits get gradient from the LM loss (= positions with a target)."""
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["logits"] = output
    handle = model.lm_head.register_forward_hook(hook)
    out = loss_fn(model, docs, encode, random.Random(0), torch.Generator().manual_seed(0))
    handle.remove()
    out["lm_loss"].backward()
    return set(captured["logits"].grad[0].abs().sum(-1).nonzero().flatten().tolist())


# -- documents ------------------------------------------------------------------------------
def test_edit_documents_from_shapesworld_and_a_folder(tokenizer, tmp_path):
    from fusion.config import compose
    from fusion.data.datamodule import DocumentDataModule

    cfg = compose("train", ["experiment=edit_transfusion_tiny", "debug=default",
                            "data.image_size=32", "data.edit_kinds=[recolor, remove]"])
    dm = DocumentDataModule(cfg.data, tokenizer)
    dm.setup()
    assert len(dm.train_set) == cfg.data.num_train and len(dm.val_set) == cfg.data.num_val
    doc = dm.train_set[0]
    src, text, tgt = doc.segments
    assert doc.is_edit and src.is_condition and not tgt.is_condition
    assert src.pixels.shape == (3, 32, 32) and not torch.equal(src.pixels, tgt.pixels)
    assert tokenizer.decode(text.ids).split()[0] in ("make", "remove")
    assert all(r.instruction for r in dm.held_out(3))
    # a user's folder of triplets: edits.jsonl, same bad-input rules as captions
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        PILImage.new("RGB", (40, 30), color).save(tmp_path / name)
    rows = [{"source": "a.png", "instruction": "make it blue", "target": "b.png"}] * 3
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("train", ["experiment=edit_chameleon_tiny", "data=folder",
                            "data.documents=edit", f"data.root={tmp_path}", "data.val_share=0.4",
                            "data.image_size=32"])
    dm = DocumentDataModule(cfg.data, tokenizer)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (2, 1)
    assert dm.train_set[0].is_edit and dm.train_set[0].images[0].pixels.shape == (3, 32, 32)


def test_triplets_become_each_familys_sequence():
    t_model, t_loss = transfusion()
    doc = edit_docs(1)[0]
    pieces = t_loss.pieces(doc, t_model.tokens_per_image, False, text_targets=False)
    from fusion.models.packing import Context, ImageSlot

    assert [type(p).__name__ for p in pieces] == [
        "list", "list", "ImageSlot", "list", "Context", "list", "ImageSlot", "list", "list"]
    assert pieces[4] == [20, 30, 31] and isinstance(pieces[2], ImageSlot)
    c_model, c_loss = chameleon()
    docs = edit_docs(1, side=8)
    (seq,) = c_loss.documents(c_model, docs, vq_encode, random.Random(0))
    codes = [VOCAB + c for c in vq_encode(torch.stack([i.pixels for i in docs[0].images]))
             .flatten(1).tolist()[0]]
    flat = [t for p in seq for t in p]
    assert flat[:7] == [SPECIAL.bos, SPECIAL.boi, *codes, SPECIAL.eoi]
    assert flat[7:10] == [20, 30, 31] and flat[10] == SPECIAL.boi and flat[-1] == SPECIAL.eos
    # source span and instruction are context; the target span is predicted
    assert [isinstance(p, Context) for p in seq] == [False, True, True, False, True]


def test_condition_dropout_follows_instructpix2pix():
    doc = edit_docs(1)[0]
    kinds = {}
    rng = random.Random(0)
    for _ in range(6000):
        d = drop_edit_conditions(doc, rng, 0.05)
        key = ("T" if d.texts else "") + ("S" if d.is_edit else "")
        kinds[key] = kinds.get(key, 0) + 1
        assert len(d.images) >= 1 and not d.images[-1].is_condition  # target always kept
    # 5 % each of: no instruction, no source, neither; the rest intact
    for key in ("S", "T", ""):
        assert 0.03 < kinds[key] / 6000 < 0.07, kinds
    caption = Document((Text((5,)), Image(torch.zeros(3, 8, 8))))
    assert drop_edit_conditions(caption, rng, 0.3) is caption
    with pytest.raises(ValueError, match=r"edit condition dropout must be in \[0, 1/3\]"):
        drop_edit_conditions(doc, rng, 0.5)


# -- objectives -------------------------------------------------------------------------------
def test_transfusion_source_is_never_noised_nor_scored():
    model, loss = transfusion(edit_condition_dropout=0.0)
    docs = edit_docs(2)
    seen = {}
    original = model.forward

    def spy(ids, layout, packed=None, latents=None, t=None, **kw):
        h, logits, image_out = original(ids, layout, packed, latents, t, **kw)
        image_out.retain_grad()
        seen.update(latents=latents, t=t, out=image_out)
        return h, logits, image_out
    model.forward = spy
    for step in range(3):  # whatever timesteps are drawn
        out = loss(model, docs, vae_encode, random.Random(step),
                   torch.Generator().manual_seed(step))
        clean = vae_encode(torch.stack([d.images[0].pixels for d in docs]))
        assert seen["t"][0::2].eq(0).all() and seen["t"][1::2].gt(0).all()
        assert torch.equal(seen["latents"][0::2], clean)  # sources: exactly the clean latents
        out["diffusion_loss"].backward()
        grad = seen["out"].grad.flatten(1).abs().sum(1)
        assert grad[0::2].eq(0).all() and grad[1::2].gt(0).all()  # sources never scored


@pytest.mark.parametrize("instruction_loss", [False, True])
def test_transfusion_instruction_loss_is_a_switch(instruction_loss):
    model, loss = transfusion(edit_condition_dropout=0.0, instruction_loss=instruction_loss)
    # <bos> <boi> [16] <eoi> i0 i1 i2 <boi> [16] <eoi> <eos>: positions 0, 1, 2-17, 18, 19-21 ..
    got = target_positions(loss, model, edit_docs(1), vae_encode)
    structure = {0, 21, 39}  # <bos> -> <boi>, last instruction token -> <boi>, <eoi> -> <eos>
    assert got == (structure | {18, 19, 20} if instruction_loss else structure)


@pytest.mark.parametrize("edit_loss", ["target", "all"])
def test_chameleon_source_is_never_a_loss_target_by_default(edit_loss):
    model, loss = chameleon(edit_condition_dropout=0.0, cm3=True, cm3_rate=1.0,
                            cm3_lambda=3.0, edit_loss=edit_loss)
    # <bos> <boi> s s s s <eoi> i0 i1 i2 <boi> t t t t <eoi> <eos>: positions 0..16
    got = target_positions(loss, model, edit_docs(1, side=8), vq_encode)
    if edit_loss == "target":  # predicting <boi> t t t t <eoi> only (CM3 never applies)
        assert got == set(range(9, 15))
    else:
        assert got == set(range(0, 16))


def _fit(model, loss, batch, encode, part, steps):
    """(first, last) value of loss part ``part`` over ``steps`` AdamW steps on one batch, with
    the same noise and timesteps every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    values = []
    for _ in range(steps):
        out = loss(model, batch, encode, random.Random(0), torch.Generator().manual_seed(0))
        values.append(out[part].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return values[0], values[-1]


def test_tiny_models_overfit_one_edit_batch():
    model, loss = transfusion(edit_condition_dropout=0.0)
    first, last = _fit(model, loss, edit_docs(4), vae_encode, "diffusion_loss", 100)
    assert last < 0.3 * first, (first, last)
    model, loss = chameleon(edit_condition_dropout=0.0)
    first, last = _fit(model, loss, edit_docs(4, side=8), vq_encode, "lm_loss", 60)
    # every target code is determined by its document's distinct instruction
    assert last < 0.1 * first, (first, last)


# -- sampling ---------------------------------------------------------------------------------
def test_transfusion_edit_prompt_matches_training_layout():
    """The sampler's denoising pass over the target sees exactly what training showed it:
    same model output for the same noisy target, clean source and instruction."""
    from fusion.models.attention import AttentionLayout
    from fusion.models.packing import pack
    from fusion.sampling.transfusion import TransfusionSampler

    model, loss = transfusion()
    model.eval()
    doc = edit_docs(1)[0]
    x0 = vae_encode(torch.stack([i.pixels for i in doc.images]))
    xt = torch.randn(1, 4, 8, 8)
    t = torch.tensor([0.0, 600.0])
    packed = pack([loss.pieces(doc, model.tokens_per_image, False)], model.max_seq_len, 0,
                  one_per_row=True)
    _, _, image_out = model(packed.ids, AttentionLayout(packed.doc_ids, packed.image_ids),
                            packed, torch.cat([x0[:1], xt]), t)
    s = TransfusionSampler(model, SPECIAL, loss.diffusion, encode_images=vae_encode)
    src = model.patchifier.patchify(x0[:1], t[:1])[0]
    with torch.no_grad():
        state, _ = s._start_blocks([[[1, 3], src[0], [4, *doc.texts[0].ids, 3]]])
        tokens, skips = model.patchifier.patchify(xt, t[1:])
        h = s._run(state, tokens, image=True, commit=False)
        out = model.patchifier.unpatchify(h, t[1:], skips)
    assert torch.allclose(out, image_out[1:], atol=1e-5), (out - image_out[1:]).abs().max()


@pytest.mark.parametrize("family", ["transfusion", "chameleon", "chameleon_aligned",
                                    "chameleon_copy"])
def test_edit_sampling_cached_equals_uncached(family):
    from fusion.sampling.chameleon import ChameleonSampler
    from fusion.sampling.transfusion import TransfusionSampler

    if family == "transfusion":
        model, loss = transfusion()
        make = lambda c: TransfusionSampler(model, SPECIAL, loss.diffusion,  # noqa: E731
                                            encode_images=vae_encode, use_cache=c)
        sources = torch.rand(2, 3, 16, 16) * 2 - 1
    else:
        model, _ = chameleon()
        if family in ("chameleon_aligned", "chameleon_copy"):
            model, _ = aligned_chameleon(source_copy=family == "chameleon_copy")
            randomise_edit_weights(model)
        make = lambda c: ChameleonSampler(model, SPECIAL, (2, 2), encode_images=vq_encode,  # noqa: E731
                                          use_cache=c)
        sources = torch.rand(2, 3, 8, 8) * 2 - 1
    outs = [make(c).edit(sources, [[20, 21, 22], [23]], guidance_scale=2.0,
                         image_guidance_scale=1.5, steps=3, seed=2) for c in (True, False)]
    assert outs[0].shape[0] == 2
    assert torch.allclose(outs[0].float(), outs[1].float(), rtol=1e-4, atol=1e-4)


def test_two_scale_guidance_is_instructpix2pix():
    from fusion.sampling.base import combine_guidance, guidance_scales
    from fusion.sampling.transfusion import TransfusionSampler

    full, image_only, neither = torch.randn(3, 2, 5)
    mixed = combine_guidance(torch.cat([full, image_only, neither]), (7.5, 1.5))
    expected = neither + 1.5 * (image_only - neither) + 7.5 * (full - image_only)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert guidance_scales(None) == () and guidance_scales(3.0) == (3.0,)
    assert guidance_scales(None, 1.5) == (1.0, 1.5)
    with pytest.raises(ValueError, match="do not split into 3 guidance groups"):
        combine_guidance(torch.randn(4, 5), (1.0, 2.0))
    # an image scale of 1 is instruction-only guidance, with one stream fewer
    model, loss = transfusion()
    s = TransfusionSampler(model, SPECIAL, loss.diffusion, encode_images=vae_encode)
    src = torch.rand(2, 3, 16, 16) * 2 - 1
    a = s.edit(src, [[20, 21], [22]], guidance_scale=3.0, image_guidance_scale=1.0, steps=3)
    b = s.edit(src, [[20, 21], [22]], guidance_scale=3.0, image_guidance_scale=None, steps=3)
    assert torch.allclose(a, b, atol=1e-4)


# -- edit accuracy ----------------------------------------------------------------------------
def test_edit_scorer_on_truth_and_on_the_unedited_source():
    from fusion.data.shapes import ShapesWorld, render
    from fusion.eval.editing import edit_errors, score_edits, score_reference, shapes_edit_set

    truth = score_reference("target", per_kind=6)
    assert truth["edit_accuracy"] == 1.0 and truth["psnr"] == 100.0
    assert all(truth[k]["accuracy"] == 1.0 and truth[k]["edits"] == 6
               for k in ("recolor", "move", "add", "remove"))
    unedited = score_reference("source", per_kind=6)
    assert unedited["edit_accuracy"] == 0.0 and unedited["psnr"] < 40
    world = ShapesWorld(size=64)
    (recolor,) = shapes_edit_set(world, 1, kinds=["recolor"])
    changed = next(o for o in recolor.target.objects if o not in recolor.source.objects)
    assert any(e.startswith(f"no {changed.name}") for e in edit_errors(
        recolor, recolor.source.objects, 4.0))
    # an added object may be anywhere: the add instruction does not say where
    (add,) = shapes_edit_set(world, 1, kinds=["add"])
    new = add.target.objects[-1]
    far = type(new)(new.shape, new.color, (1.0, 1.0, 1.0 + new.size, 1.0 + new.size))
    assert edit_errors(add, [*add.source.objects, far], 4.0) == []
    with pytest.raises(ValueError, match="2 edits but 1 outputs"):
        score_edits([recolor, add], [render(add.target)])


# -- init_from --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Tiny f8 VAE and VQ-GAN artifacts, a second VAE, and a second text tokenizer."""
    from fusion.data.text import TextTokenizer, shapes_corpus
    from fusion.image.vae import VAETokenizer, build_autoencoder
    from fusion.image.vqgan import VQTokenizer

    root = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for name, seed in (("vae", 0), ("vae2", 1)):
        torch.manual_seed(seed)
        paths[name] = VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)) \
            .save_pretrained(root / name)
    paths["vq"] = VQTokenizer({"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8,
                               "latent_channels": 4}).save_pretrained(root / "vq")
    paths["tok2"] = TextTokenizer.train(shapes_corpus(300), vocab_size=420,
                                        show_progress=False).save(root / "tok2")
    return {k: str(v) for k, v in paths.items()}


def _saved_model(out, overrides, text_tokenizer="tokenizers/shapes-bpe/tokenizer.json"):
    """Build and save an experiment's (untrained) model: a stand-in for a pre-trained one."""
    from fusion.config import compose, resolve_path
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.families.folders import save_model

    cfg = compose("train", overrides)
    tok = TextTokenizer.from_file(resolve_path(text_tokenizer))
    model, _ = build_family(cfg.model, tok, load_image_tokenizer(cfg.image_tokenizer), 64)
    save_model(out, model, cfg.model, text_tokenizer, cfg.image_tokenizer,
               extra={"image_size": 64, "steps": 0})
    return model


def _init(run_overrides, path):
    from fusion.config import compose, resolve_path
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.training.init_from import init_from_checkpoint

    cfg = compose("train", [*run_overrides, f"init_from={path}"])
    tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    model, _ = build_family(cfg.model, tok, load_image_tokenizer(cfg.image_tokenizer), 64)
    init_from_checkpoint(model, cfg, tok)
    return model


def test_init_from_loads_a_model_folder_and_a_lightning_checkpoint(artifacts, tmp_path):
    run = ["experiment=edit_transfusion_tiny", f"image_tokenizer={artifacts['vae']}"]
    saved = _saved_model(tmp_path / "model", run)
    model = _init(run, tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    # a Lightning checkpoint <run>/checkpoints/last.ckpt (EMA weights preferred), read with
    # weights_only=True and checked against <run>/model/config.json
    (tmp_path / "checkpoints").mkdir()
    ema = {f"ema.module.{k}": v + 1 for k, v in saved.state_dict().items()}
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in saved.state_dict().items()},
                               **ema}, "global_step": 3}, tmp_path / "checkpoints" / "last.ckpt")
    model = _init(run, tmp_path / "checkpoints" / "last.ckpt")
    assert torch.equal(model.embed.weight, saved.embed.weight + 1)
    # anything but tensors and plain containers is refused, not unpickled
    torch.save({"state_dict": {}, "evil": Path("x")}, tmp_path / "checkpoints" / "bad.ckpt")
    from fusion.training.init_from import InitFromError

    with pytest.raises(InitFromError, match="weights_only=True"):
        _init(run, tmp_path / "checkpoints" / "bad.ckpt")
    with pytest.raises(InitFromError, match="no such file or folder"):
        _init(run, tmp_path / "missing")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(InitFromError, match="is corrupt or not a safetensors file"):
        _init(run, tmp_path / "model")


def test_mismatched_init_from_says_what_differs(artifacts, tmp_path):
    from fusion.data.text import TextTokenizer
    from fusion.training.init_from import InitFromError

    t_run = ["experiment=edit_transfusion_tiny", f"image_tokenizer={artifacts['vae']}"]
    _saved_model(tmp_path / "t", t_run)
    c_run = ["experiment=edit_chameleon_tiny", f"image_tokenizer={artifacts['vq']}"]
    with pytest.raises(InitFromError, match="family: the checkpoint is a 'transfusion' model, "
                                            "this run trains 'chameleon'"):
        _init(c_run, tmp_path / "t")
    with pytest.raises(InitFromError, match=r"image tokenizer: the checkpoint was trained with "
                                            r".*vae, this run uses .*vae2 .*set image_tokenizer="):
        _init(["experiment=edit_transfusion_tiny", f"image_tokenizer={artifacts['vae2']}"],
              tmp_path / "t")
    with pytest.raises(InitFromError) as err:
        _init([*t_run, f"data.text_tokenizer={artifacts['tok2']}"], tmp_path / "t")
    msg = str(err.value)
    ours = TextTokenizer.from_file(artifacts["tok2"]).vocab_size
    assert "text vocabulary: the checkpoint's tokenizer (tokenizers/shapes-bpe/tokenizer.json) " \
           f"has 387 tokens, this run's ({artifacts['tok2']}) has {ours}; set " \
           "data.text_tokenizer=tokenizers/shapes-bpe/tokenizer.json" in msg
    assert f"vocabulary size: the checkpoint has 387 ids, this model {ours}" in msg
    with pytest.raises(InitFromError) as err:
        _init([*t_run, "+model.arch.backbone_overrides.d_model=128"], tmp_path / "t")
    msg = str(err.value)
    assert "weight shapes:" in msg and "vocabulary" not in msg
    assert "embed.weight: checkpoint (387, 256), this model (387, 128)" in msg
    assert "model.arch.backbone_overrides.d_model: checkpoint unset, this run 128" in msg
    # the same path, but the artifact there was retrained after the checkpoint was saved
    import shutil

    shutil.copytree(artifacts["vae"], tmp_path / "vae_here")
    here = ["experiment=edit_transfusion_tiny", f"image_tokenizer={tmp_path / 'vae_here'}"]
    _saved_model(tmp_path / "h", here)
    _init(here, tmp_path / "h")  # unchanged: fine
    shutil.copy(Path(artifacts["vae2"]) / "model.safetensors", tmp_path / "vae_here")
    with pytest.raises(InitFromError, match="trained with a different artifact at .*vae_here, "
                                            "which its files no longer match"):
        _init(here, tmp_path / "h")
    # a Chameleon checkpoint whose VQ-GAN had another codebook: the unified vocabulary differs
    _saved_model(tmp_path / "c", c_run)
    with pytest.raises(InitFromError, match="family: the checkpoint is a 'chameleon'"):
        _init(t_run, tmp_path / "c")
    # a Chameleon start model without the 2-D cell embedding, fine-tuned with it
    with pytest.raises(InitFromError) as err:
        _init([*c_run, "model.arch.image_pos_embed=true"], tmp_path / "c")
    msg = str(err.value)
    assert "image_pos.row" in msg
    assert "model.arch.image_pos_embed: checkpoint False, this run True" in msg


# -- end to end: fine-tune, edit, evaluate ----------------------------------------------------
def test_edit_finetune_then_edit_and_evaluate(artifacts, tmp_path):
    vae = artifacts["vae"]
    run = ["experiment=edit_transfusion_tiny", f"image_tokenizer={vae}"]
    _saved_model(tmp_path / "pretrained", run)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", *run, "debug=default", f"output_dir={out}",
         f"init_from={tmp_path / 'pretrained'}", "logger=csv", "callbacks.progress_bar=none",
         "sampling.diffusion_steps=2", "sampling.image_guidance_scale=1.25",
         "data.num_train=16", "data.num_val=8", "trainer.max_steps=2",
         "trainer.limit_val_batches=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["documents"] == "edit" and meta["init_from"] == str(tmp_path / "pretrained")
    assert list((out / "samples").glob("*.png"))  # source | edited | target grid

    from fusion.config import compose
    from fusion.data.shapes import ShapesWorld, render
    from fusion.eval.editing import EditEvalConfig, evaluate_editing
    from fusion.families import family_sampler
    from fusion.families.folders import load_model
    from fusion.jobs.edit import register_edit_config, run_editing

    register_edit_config()
    edit = ShapesWorld(size=64).edit(0, "recolor")
    PILImage.fromarray(render(edit.source)).save(tmp_path / "src.png")
    PILImage.fromarray(render(edit.target)).save(tmp_path / "tgt.png")
    common = [f"model_dir={out / 'model'}", "sampling.diffusion_steps=2",
              f"output_dir={tmp_path / 'edits'}"]
    cfg = compose("edit", [*common, f"image={tmp_path / 'src.png'}",
                           f"instruction='{edit.instruction}'"])
    assert run_editing(cfg)["count"] == 1
    assert np.asarray(PILImage.open(tmp_path / "edits" / "edited.png")).shape == (64, 64, 3)
    # scripts/edit.py's rule: sampling keys not given come from the model's recipe ...
    assert meta["sampling"]["image_guidance_scale"] == 1.25
    assert run_editing(cfg, given={"diffusion_steps"})["sampling"]["image_guidance_scale"] == 1.25
    # ... and a key given wins over the recorded one
    chosen = compose("edit", [*common, f"image={tmp_path / 'src.png'}", "instruction=x",
                             "sampling.image_guidance_scale=2.0"])
    used = run_editing(chosen, given={"diffusion_steps", "image_guidance_scale"})["sampling"]
    assert used["image_guidance_scale"] == 2.0 and used["diffusion_steps"] == 2
    with pytest.raises(ValueError, match="unknown sampling keys"):
        run_editing(cfg, given={"guidance"})
    row = {"source": "src.png", "instruction": edit.instruction, "target": "tgt.png"}
    (tmp_path / "triplets.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    result = run_editing(compose("edit", [*common, f"edits={tmp_path / 'triplets.jsonl'}",
                                          "sampling.image_guidance_scale=null"]))
    assert result["count"] == 2 and np.isfinite(result["psnr"])
    assert (tmp_path / "edits" / "00001.png").exists() and (tmp_path / "edits" / "edits.png").exists()
    # bad input: clear errors, before any sampling
    for overrides, message in (
            ([f"image={tmp_path / 'nope.png'}", "instruction=x"], "source image not found"),
            ([f"image={tmp_path / 'src.png'}"], "needs both image=<file> and a non-empty"),
            ([], "nothing to edit"),
            ([f"image={tmp_path / 'src.png'}", "instruction=x", "edits=e.jsonl"], "not both")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run_editing(compose("edit", [*common, *overrides]))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="is not a readable image"):
        run_editing(compose("edit", [*common, f"image={tmp_path / 'junk.png'}",
                                     "instruction=x"]))
    # edit accuracy of the (barely trained) model: runs and reports every kind
    model, loss, tok, image_tok, meta = load_model(out / "model")
    from fusion.config import SamplingConfig

    cfg = EditEvalConfig(per_kind=1, sampling=SamplingConfig(diffusion_steps=2))
    summary = evaluate_editing(family_sampler(model, loss, tok, image_tok), tok, 64, cfg,
                               progress=False)
    assert summary["edits"] == 4 and {"recolor", "move", "add", "remove"} <= set(summary)


def test_bad_edit_settings_fail_clearly(tokenizer):
    from fusion.config import compose
    from fusion.data.datamodule import DocumentDataModule, build_edit_sources

    cfg = compose("train", ["experiment=edit_transfusion_tiny"])
    cfg.data.documents = "triplets"
    with pytest.raises(ValueError, match="unknown data.documents 'triplets'"):
        DocumentDataModule(cfg.data, tokenizer)
    cfg.data.edit_kinds = ["rotate"]
    with pytest.raises(ValueError, match=r"unknown data.edit_kinds \['rotate'\]"):
        build_edit_sources(cfg.data)
    with pytest.raises(ValueError, match="unknown edit_loss 'source'"):
        chameleon(edit_loss="source")


def test_bad_triplet_folder_is_refused_naming_the_rows(tmp_path):
    from fusion.data.sources import BadDataError, EditFolder

    PILImage.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"source": "a.png", "instruction": "", "target": "a.png"},
            {"source": "a.png", "instruction": "x", "target": "gone.png"},
            {"source": "a.png", "instruction": "x", "target": "a.png"}]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadDataError, match="2 of 3 records are bad.*missing or empty "
                                           "instruction.*missing image file"):
        EditFolder(tmp_path, size=8, show_progress=False)


def test_chameleon_edit_grid_and_batch_editing(artifacts, tmp_path):
    """The Chameleon side of the recipe in-process: the training grid and scripts/edit.py."""
    from fusion.config import compose, resolve_path
    from fusion.data.datamodule import DocumentDataModule
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.jobs.edit import register_edit_config, run_editing
    from fusion.training.samplers import make_edit_sampler

    run = ["experiment=edit_chameleon_tiny", f"image_tokenizer={artifacts['vq']}",
           "debug=default"]
    cfg = compose("train", run)
    tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    image_tok = load_image_tokenizer(cfg.image_tokenizer)
    model, loss = build_family(cfg.model, tok, image_tok, 64)
    records = DocumentDataModule(cfg.data, tok).held_out(2)
    grid = make_edit_sampler(cfg, tok, image_tok, loss, records)(model)
    assert grid([r.instruction for r in records]).shape == (2, 3, 64, 192)
    with pytest.raises(ValueError, match="captions must be its records' instructions"):
        grid(["something else", "x"])
    _saved_model(tmp_path / "model", run)
    for i, r in enumerate(records):
        PILImage.fromarray(r.source).save(tmp_path / f"s{i}.png")
        PILImage.fromarray(r.target).save(tmp_path / f"t{i}.png")
    rows = [{"source": f"s{i}.png", "instruction": r.instruction, "target": f"t{i}.png"}
            for i, r in enumerate(records)]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    register_edit_config()
    result = run_editing(compose("edit", [f"model_dir={tmp_path / 'model'}",
                                          f"edits={tmp_path}", f"output_dir={tmp_path / 'out'}",
                                          "sampling.top_k=8"]))
    assert result["count"] == 2
    lines = (tmp_path / "out" / "edits.jsonl").read_text().splitlines()
    assert [json.loads(x)["instruction"] for x in lines] == [r.instruction for r in records]


def test_tokenizer_ceiling_scores_reconstructed_targets(artifacts):
    from fusion.eval.editing import score_reference

    ceiling = score_reference("tokenizer", per_kind=1, image_tokenizer=artifacts["vae"])
    assert ceiling["edits"] == 4 and ceiling["psnr"] < 100  # an untrained VAE is lossy
    with pytest.raises(ValueError, match="needs image_tokenizer"):
        score_reference("tokenizer", per_kind=1)


def test_local_target_ceiling_keeps_the_source_where_nothing_changed(artifacts):
    from fusion.data.shapes import ShapesWorld, render
    from fusion.eval.editing import score_reference, shapes_edit_set
    from fusion.eval.reconstruction import reconstruct
    from fusion.families import load_image_tokenizer

    vq = load_image_tokenizer(artifacts["vq"])
    edits = shapes_edit_set(ShapesWorld(), 1)
    sources = np.stack([render(e.source) for e in edits])
    targets = np.stack([render(e.target) for e in edits])
    targets[0] = sources[0]  # an edit that changes nothing decodes the source's codes
    local = reconstruct(vq, targets, progress=False, sources=sources)
    plain = reconstruct(vq, targets, progress=False)
    assert np.array_equal(local[0], plain[0])
    assert local.shape == plain.shape
    ceiling = score_reference("tokenizer", per_kind=1, image_tokenizer=artifacts["vq"],
                              local_targets=True)
    assert ceiling["edits"] == 4
    with pytest.raises(ValueError, match="local_targets needs"):
        score_reference("source", per_kind=1, local_targets=True)
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruct(vq, targets, progress=False, sources=sources[:, :32])


# -- Chameleon source alignment (fusion.models.chameleon.source_alignment) -------------------
def aligned_chameleon(seed=0, source_alignment=True, source_copy=False, **loss_kw):
    torch.manual_seed(seed)
    model = Chameleon(ChameleonConfig(backbone_overrides=SMALL, source_alignment=source_alignment,
                                      source_copy=source_copy), VOCAB, CODEBOOK,
                      codes_per_image=4)
    return model, ChameleonLoss(ChameleonLossConfig(**loss_kw), SPECIAL, TOKENS)


def randomise_edit_weights(model):
    """The editing additions start at zero; give them weights that matter to the output."""
    with torch.no_grad():
        model.source_proj.weight.normal_(0, 0.5)
        if model.copy_gate is not None:
            model.copy_gate.weight.normal_(0, 0.5)
            model.copy_gate.bias.fill_(0.3)


def test_source_alignment_marks_the_cell_each_target_position_predicts():
    from fusion.models.chameleon import source_alignment

    src, tgt = [40, 41, 42, 43], [50, 51, 52, 53]
    doc = [1, 3, *src, 4, 20, 21, 3, *tgt, 4, 2]
    got = source_alignment(doc, boi=3, eoi=4, text_vocab=VOCAB)
    # <boi> (position 9) predicts cell 0, code k (10 + k) predicts k + 1, the last one <eoi>
    assert got == [-1] * 9 + src + [-1] * 3
    assert source_alignment(doc[:12], 3, 4, VOCAB) == got[:12]  # a sampling prefix
    assert source_alignment([1, 3, *src, 4, 20, 2], 3, 4, VOCAB) == [-1] * 9  # one image
    assert source_alignment([1, 3, *src, 3, *tgt], 3, 4, VOCAB) == [-1] * 11  # not closed


def test_source_alignment_starts_as_the_plain_model_and_loads_its_weights():
    from fusion.training.init_from import _weight_differences

    plain, loss = aligned_chameleon(source_alignment=False, edit_condition_dropout=0.0)
    aligned = Chameleon(ChameleonConfig(backbone_overrides=SMALL, source_alignment=True),
                        VOCAB, CODEBOOK, codes_per_image=4)
    assert _weight_differences(aligned, plain.state_dict()) == []  # init_from accepts it
    aligned.load_state_dict(plain.state_dict(), strict=False)
    batch = edit_docs(2, side=8)
    a = loss(plain, batch, vq_encode, random.Random(0))["lm_loss"]
    b = loss(aligned, batch, vq_encode, random.Random(0))["lm_loss"]
    assert torch.equal(a, b)
    # ... and the reverse is refused: the plain run lacks the projection
    assert "lacks" in " ".join(_weight_differences(plain, aligned.state_dict()))


@pytest.mark.parametrize("source_copy", [False, True])
def test_chameleon_edit_sampler_sees_what_training_saw_with_source_alignment(monkeypatch,
                                                                            source_copy):
    """Teacher-forced through the sampler, every target position gets the logits training
    computed for it: same aligned source code at the same position (and, with
    ``source_copy``, the same copy mixture at the output)."""
    import fusion.sampling.chameleon as sampling
    from fusion.sampling.chameleon import ChameleonSampler

    model, loss = aligned_chameleon(edit_condition_dropout=0.0, source_copy=source_copy)
    randomise_edit_weights(model)
    model.eval()
    doc = edit_docs(1, side=8)[0]
    captured = {}
    handle = model.register_forward_hook(lambda m, a, out: captured.update(out=out))
    with torch.no_grad():
        loss(model, [doc], vq_encode, random.Random(0))
    handle.remove()
    # <bos> <boi> s×4 <eoi> instruction×3 <boi> t×4: positions 10..13 predict the 4 codes
    trained = captured["out"][0, 10:14, VOCAB:].float().log_softmax(-1)
    target = vq_encode(doc.images[1].pixels[None]).flatten()
    seen = []

    def forced(logp, sampling_, allowed, generator):
        seen.append(logp[:, VOCAB:].log_softmax(-1))
        return VOCAB + target[len(seen) - 1].repeat(logp.shape[0])
    monkeypatch.setattr(sampling, "sample_token", forced)
    s = ChameleonSampler(model, SPECIAL, (2, 2), encode_images=vq_encode)
    s.edit(doc.images[0].pixels[None], [list(doc.texts[0].ids)], guidance_scale=None)
    assert torch.allclose(torch.cat(seen), trained, atol=1e-4)


def test_source_copy_mixes_the_aligned_code_into_a_distribution():
    """Pointer-generator output: where a source code is aligned, a normalised mixture of
    copying it (weight g) and the LM head's softmax (1 - g); elsewhere the plain logits."""
    model, _ = aligned_chameleon(source_copy=True)
    hidden = torch.randn(2, 3, model.embed.weight.shape[1])
    source = torch.tensor([[VOCAB + 1, -1, VOCAB + 2], [-1, VOCAB + 3, VOCAB + 3]])
    with torch.no_grad():
        plain = model.lm_head(hidden)
        out = model.head(hidden, source)  # g = 0.5 at the start (zero gate)
        aligned = source >= 0
        assert torch.allclose(out[~aligned], plain[~aligned])
        assert torch.allclose(out[aligned].logsumexp(-1), torch.zeros(4), atol=1e-5)
        probs = out[aligned].exp()
        expected = 0.5 * plain[aligned].softmax(-1)
        expected[torch.arange(4), source[aligned]] += 0.5
        assert torch.allclose(probs, expected, atol=1e-5)
        model.copy_gate.bias.fill_(30.0)  # g -> 1: the source's code, surely
        picked = model.head(hidden, source)[aligned].argmax(-1)
        assert torch.equal(picked, source[aligned])
        model.copy_gate.bias.fill_(-30.0)  # g -> 0: the LM head alone
        assert torch.allclose(model.head(hidden, source)[aligned],
                              plain[aligned].log_softmax(-1), atol=1e-5)
    assert torch.equal(model.head(hidden), plain)  # nothing aligned (text->image, captions)


def test_source_copy_needs_source_alignment_and_loads_a_plain_model():
    from fusion.training.init_from import _weight_differences

    with pytest.raises(ValueError, match="source_copy .* needs source_alignment"):
        aligned_chameleon(source_alignment=False, source_copy=True)
    plain, _ = aligned_chameleon(source_alignment=False)
    copying, _ = aligned_chameleon(source_copy=True)
    assert _weight_differences(copying, plain.state_dict()) == []  # init_from accepts it


# -- Chameleon code digits (fusion.models.chameleon.code_digits) -----------------------------
def test_code_digits_follow_the_fsq_index_order():
    from vector_quantize_pytorch import FSQ

    from fusion.models.chameleon import code_digits

    levels = [8, 5, 5, 5]
    digits = FSQ(levels=levels).indices_to_level_indices(torch.arange(1000))  # (K, 4)
    offsets = torch.tensor([0, 8, 13, 18])
    expected = torch.zeros(23, 1000)
    expected[offsets + digits, torch.arange(1000)[:, None]] = 1.0
    assert torch.equal(code_digits(levels), expected)


def test_code_digit_head_adds_each_codes_digit_scores_and_starts_unchanged():
    from fusion.training.init_from import _weight_differences

    plain, _ = aligned_chameleon(source_copy=True)
    torch.manual_seed(0)
    digits = Chameleon(ChameleonConfig(backbone_overrides=SMALL, source_alignment=True,
                                       source_copy=True, code_digit_levels=[4, 4]),
                       VOCAB, CODEBOOK, codes_per_image=4)
    assert _weight_differences(digits, plain.state_dict()) == []  # init_from accepts it
    digits.load_state_dict(plain.state_dict(), strict=False)
    hidden = torch.randn(2, 3, digits.embed.weight.shape[1])
    source = torch.tensor([[VOCAB + 1, -1, VOCAB + 2], [-1, -1, VOCAB + 3]])
    with torch.no_grad():
        assert torch.equal(digits.head(hidden), plain.head(hidden))  # zero at the start
        digits.digit_head.weight.normal_(0, 0.5)
        scores = digits.digit_head(hidden)  # (2, 3, 8): digit 0 values, then digit 1's
        code = torch.arange(CODEBOOK)
        expected = plain.head(hidden)[..., VOCAB:] + scores[..., code % 4] + scores[
            ..., 4 + code // 4]
        out = digits.head(hidden)
        assert torch.equal(out[..., :VOCAB], plain.head(hidden)[..., :VOCAB])  # text: as before
        assert torch.allclose(out[..., VOCAB:], expected, atol=1e-5)
        # under the copy gate the mixture is still a normalised distribution
        mixed = digits.head(hidden, source)[source >= 0]
        assert torch.allclose(mixed.logsumexp(-1), torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError, match="product is its codebook size 16"):
        Chameleon(ChameleonConfig(backbone_overrides=SMALL, code_digit_levels=[4, 5]),
                  VOCAB, CODEBOOK, codes_per_image=4)


def test_code_digit_levels_must_match_the_image_tokenizer():
    from types import SimpleNamespace

    from fusion.families.chameleon import build

    def image_tokenizer(quantizer):
        return SimpleNamespace(latent_grid=lambda size: (2, 2), codebook_size=CODEBOOK,
                               quantizer_config=quantizer)
    cfg = {"arch": {"backbone_overrides": SMALL, "code_digit_levels": [4, 4]}}
    with pytest.raises(ValueError, match=r"FSQ levels; its quantizer is 'fsq' with levels "
                                         r"\[2, 8\]"):
        build(cfg, None, image_tokenizer({"kind": "fsq", "levels": [2, 8]}), 8)
    with pytest.raises(ValueError, match="its quantizer is 'vq'"):
        build(cfg, None, image_tokenizer({"kind": "vq", "codebook_size": 16}), 8)


def test_code_digit_head_generalises_to_codes_it_never_saw():
    """Trained on codes (first digit, second digit) = (2, 0), (2, 1), (1, 3), (0, 3), the digit
    head raises the probability of the unseen code (2, 3), whose digits it saw in other
    codes; the LM head's per-code rows, trained alike, lower it."""
    seen, unseen = torch.tensor([2 + 4 * 0, 2 + 4 * 1, 1 + 4 * 3, 0 + 4 * 3]), 2 + 4 * 3

    def unseen_probability(train: str) -> tuple[float, float]:
        torch.manual_seed(0)
        model = Chameleon(ChameleonConfig(backbone_overrides=SMALL, code_digit_levels=[4, 4]),
                          VOCAB, CODEBOOK, codes_per_image=4)
        # one context, four right answers: a factorised fit is the product of the digits'
        # marginals, 0.5 x 0.5 for the unseen code
        hidden = torch.randn(1, model.embed.weight.shape[1], generator=torch.Generator()
                             .manual_seed(1)).expand(64, -1)
        targets = seen[torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))]
        head = model.digit_head if train == "digits" else model.lm_head
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)

        def p_unseen():
            with torch.no_grad():
                return float(model.head(hidden)[:, VOCAB:].softmax(-1)[:, unseen].mean())
        before = p_unseen()
        for _ in range(30):
            loss = F.cross_entropy(model.head(hidden)[:, VOCAB:], targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return before, p_unseen()

    before, with_digits = unseen_probability("digits")
    _, with_rows = unseen_probability("rows")
    assert with_digits > 3 * before and with_rows < before / 3, (before, with_digits, with_rows)


def test_source_alignment_learns_to_copy_unseen_images():
    """Identity edits (target = source) of random images behind instructions of random length:
    with the aligned source code a tiny model copies images it never saw; without it, it has
    to find the source at a distance that changes with the instruction. With the copy gate
    (``source_copy``) it only has to learn to open the gate."""
    def identity_edits(n, seed):
        g = torch.Generator().manual_seed(seed)
        blocks = torch.rand(n, 1, 2, 2, generator=g) * 2 - 1  # one random code per cell
        pixels = F.interpolate(blocks, scale_factor=4).expand(n, 3, 8, 8)
        # instructions of 1..8 ids: the source is a different distance back in each
        lengths = torch.randint(1, 9, (n,), generator=g).tolist()
        return [Document((Image(p, is_condition=True), Text(tuple(range(20, 20 + k))),
                          Image(p))) for p, k in zip(pixels, lengths, strict=True)]

    def heldout_loss(source_alignment, source_copy=False):
        model, loss = aligned_chameleon(source_alignment=source_alignment,
                                        source_copy=source_copy, edit_condition_dropout=0.0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for step in range(80):
            out = loss(model, identity_edits(8, step), vq_encode, random.Random(step))
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        with torch.no_grad():
            return loss(model, identity_edits(32, 999), vq_encode,
                        random.Random(0))["lm_loss"].item()
    aligned, plain = heldout_loss(True), heldout_loss(False)
    assert plain > 1.5 and aligned < 0.25 * plain, (aligned, plain)
    # the copy gate makes it a yes/no question: lower still
    copying = heldout_loss(True, source_copy=True)
    assert copying < 0.5 * aligned, (copying, aligned)


# -- Chameleon local edit targets (fusion.models.chameleon.local_edit_codes) ------------------
def test_local_edit_codes_take_the_target_only_near_the_change():
    from fusion.models.chameleon import local_edit_codes

    source = torch.zeros(1, 3, 32, 32)
    target = source.clone()
    target[:, 1, 2:5, 3:6] = 0.5  # pixels of cell (0, 0) only
    src_codes, tgt_codes = torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4,
                                                                              dtype=torch.long)
    near = local_edit_codes(src_codes, tgt_codes, source, target)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[:2, :2] = 1  # the changed cell and its neighbours
    assert torch.equal(near[0], expected)
    only = local_edit_codes(src_codes, tgt_codes, source, target, dilation=0)
    assert int(only.sum()) == 1 and only[0, 0, 0] == 1
    # a change below the tolerance (quantisation noise) keeps every source code
    assert not local_edit_codes(src_codes, tgt_codes, source, source + 0.01).any()
    with pytest.raises(ValueError, match="does not tile"):
        local_edit_codes(src_codes, tgt_codes, source[..., :30], target[..., :30])


def test_chameleon_local_edit_targets_keep_the_source_codes_away_from_the_edit():
    """With a non-local tokenizer (every code shifts with the image's overall brightness), the
    encoded target differs from the source everywhere; ``local`` keeps the source's codes
    outside the edited corner."""
    def global_encode(pixels):  # (I, 3, 16, 16) -> (I, 4, 4)
        local = ((F.avg_pool2d(pixels.mean(1, keepdim=True), 4)[:, 0] + 1) * 4).long()
        return (local + 5 * (pixels.sum((1, 2, 3)) > 0).long()[:, None, None]) % CODEBOOK

    g = torch.Generator().manual_seed(0)
    source = torch.rand(3, 16, 16, generator=g) * 0.15 - 0.1
    target = source.clone()
    target[:, 12:, 12:] = 1.0  # the bottom-right cell: the image's sum turns positive
    doc = Document((Image(source, is_condition=True), Text(INSTR), Image(target)))
    src, tgt = global_encode(torch.stack([source, target])).flatten(1)
    assert (src != tgt).all()
    spans = {}
    for mode in ("encoded", "local"):
        model, loss = chameleon(edit_condition_dropout=0.0, edit_target_codes=mode,
                                codes_per_image=16)
        (pieces, _), = loss.documents_with_cells(model, [doc], global_encode, random.Random(0))
        ids = [t for p in pieces for t in p]
        spans[mode] = torch.tensor(ids[-18:-2]) - VOCAB  # <boi> 16 codes <eoi> <eos>
    assert torch.equal(spans["encoded"], tgt)
    near = torch.zeros(4, 4, dtype=torch.bool)
    near[2:, 2:] = True  # the edited cell (3, 3) and its neighbours
    assert torch.equal(spans["local"], torch.where(near.flatten(), tgt, src))
    with pytest.raises(ValueError, match="edit_target_codes"):
        chameleon(edit_target_codes="nearby")


# -- Chameleon edit diagnosis (fusion.eval.edit_diagnosis) -------------------------------------
def test_edit_diagnosis_splits_copy_and_changed_cells(artifacts, capsys, monkeypatch):
    """A model whose copy gate is forced open copies every cell: right on every copy cell and
    wrong on every changed one, teacher-forced and sampled alike, and its grid with the true
    changed cells put back is the true grid."""
    from fusion.config import compose, resolve_path
    from fusion.data.shapes import ShapesWorld
    from fusion.data.text import TextTokenizer
    from fusion.eval.edit_diagnosis import diagnose_chameleon_edits, format_diagnosis
    from fusion.eval.editing import shapes_edit_set
    from fusion.families import build_family, family_sampler, load_image_tokenizer
    from fusion.sampling.text import TokenSampling

    cfg = compose("train", ["experiment=edit_chameleon_tiny", f"image_tokenizer={artifacts['vq']}",
                            "debug=default"])
    tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    image_tok = load_image_tokenizer(cfg.image_tokenizer)
    model, loss = build_family(cfg.model, tok, image_tok, 64)
    assert model.copy_gate is not None  # the recipe copies
    with torch.no_grad():
        model.copy_gate.bias.fill_(40.0)
    edits = shapes_edit_set(ShapesWorld(seed=0, size=64), 3, 1_000_000, kinds=["move"])
    sampler = family_sampler(model, loss, tok, image_tok)
    d = diagnose_chameleon_edits(sampler, tok, image_tok, edits, 3.0, 1.5,
                                 TokenSampling(top_k=8), batch_size=2)
    assert d["edits"] == 3 and d["changed_cells_per_edit"] > 0
    assert d["teacher_forced_accuracy"] == {"copy": 1.0, "changed": 0.0}
    assert d["teacher_forced_nll"]["copy"] < 1e-6 and d["teacher_forced_nll"]["changed"] > 10
    assert d["sampled_code_match"] == {"copy": 1.0, "changed": 0.0}
    assert d["edits_with_every_copy_cell_right"] == 1.0
    acc = d["edit_accuracy"]
    assert acc["true_changed_cells"] == acc["true_grid"]
    assert acc["sampled"] == acc["true_copy_cells"]  # its copy cells were already right
    assert "changed cells" in format_diagnosis(d)
    assert sampler.decode_images is not None  # handed back after drawing codes

    with pytest.raises(ValueError, match="Chameleon models only"):
        diagnose_chameleon_edits(type("S", (), {"model": torch.nn.Linear(1, 1)})(), tok,
                                 image_tok, edits, 3.0, None, TokenSampling())
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts/evaluate.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    monkeypatch.delenv("FUSION_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # a user error: one `error:` line, status 2
        ev.main(["editing", "--diagnose"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: --diagnose needs --model")
