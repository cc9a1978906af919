"""Transfusion family: loss masks, leak checks, cached sampling, CFG, overfitting."""

import random

import pytest
import torch
import torch.nn.functional as F

from fusion.data.documents import Document, Image, Text
from fusion.models.diffusion import Diffusion
from fusion.models.packing import SpecialIds
from fusion.models.schemas import DiffusionConfig, TransfusionConfig, TransfusionLossConfig
from fusion.models.transfusion import Transfusion, TransfusionLoss
from fusion.sampling.transfusion import TransfusionSampler

SPECIAL = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4)
VOCAB = 32


def encode(pixels):
    """A fixed stand-in for the VAE: (I, 3, 16, 16) -> (I, 4, 8, 8)."""
    x = F.avg_pool2d(pixels, 2)
    return torch.cat([x, x[:, :1] * 0.5], 1)


def make_model(seed=0, patchifier="linear", **loss_kw):
    torch.manual_seed(seed)
    arch = TransfusionConfig(backbone="tiny", backbone_overrides=dict(
        d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, multiple_of=32),
        patchifier=patchifier, patch_size=2, latent_channels=4, latent_size=8)
    if patchifier == "unet":
        arch.patchifier_args = dict(block_out_channels=(16, 32), layers_per_block=1,
                                    norm_num_groups=8)
    model = Transfusion(arch, VOCAB)
    # Output layers start at zero (DiT init); give them weights so that every check below sees
    # a model whose image output actually depends on its inputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.05)
    loss = TransfusionLoss(TransfusionLossConfig(**loss_kw), SPECIAL)
    return model, loss


def docs(n=4, seed=0, image_first_every=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = Image(torch.rand(3, 16, 16, generator=g) * 2 - 1)
        text = Text(tuple(int(x) for x in torch.randint(5, VOCAB, (4,), generator=g)))
        image_first = i % image_first_every == image_first_every - 1
        out.append(Document((img, text) if image_first else (text, img)))
    return out


def test_lm_loss_reads_text_only_and_diffusion_loss_reads_images_only():
    model, loss = make_model(caption_dropout=0.0)
    captured = {}

    def hook(module, args, output):
        output.retain_grad()
        captured["h"] = output
    model.transformer.register_forward_hook(hook)
    for part, reads_images in (("lm_loss", False), ("diffusion_loss", True)):
        model.zero_grad()
        out = loss(model, docs(), encode, random.Random(0), torch.Generator().manual_seed(0))
        out[part].backward()
        h = captured["h"]
        grad = h.grad.abs().sum(-1)  # (B, S)
        from fusion.models.packing import pack
        packed = pack([loss.pieces(d, model.tokens_per_image, False) for d in docs()],
                      model.max_seq_len, SPECIAL.pad)
        image_pos = packed.image_ids >= 0
        if reads_images:
            assert grad[~image_pos].sum() == 0 and (grad[image_pos] > 0).all()
        else:
            assert grad[image_pos].sum() == 0 and grad[packed.next_token_targets() != -100].gt(
                0).all()


@pytest.mark.parametrize("patchifier", ["linear", "unet"])
def test_both_patchifiers_train_under_bf16_autocast(patchifier):
    """bf16-mixed is the tiny recipes' precision. The U-Net patchifier's tokens come out bf16
    while text embeddings stay fp32; writing them into the sequence once failed with "Index put
    requires the source and destination dtypes match" (scatter_images now casts)."""
    model, loss = make_model(patchifier=patchifier)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(model, docs(), encode, random.Random(0), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["diffusion_loss"] > 0
    assert all(p.grad is not None for p in model.patchifier.parameters() if p.requires_grad)


def test_image_patches_do_not_leak_into_earlier_text():
    model, _ = make_model()
    model.eval()
    from fusion.models.packing import ImageSlot, pack
    p = pack([[[1, 7, 8, 3], ImageSlot(16), [4, 9, 2]]], 64, 0)
    from fusion.models.attention import AttentionLayout
    layout = AttentionLayout(p.doc_ids, p.image_ids)
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    _, logits, _ = model(p.ids, layout, p, latents, torch.tensor([500]))
    before = logits[0, :4].sum()  # text up to and including <boi>
    after = logits[0, 20:].sum()  # text after the image
    g_before, = torch.autograd.grad(before, latents, retain_graph=True)
    g_after, = torch.autograd.grad(after, latents)
    assert g_before.abs().sum() == 0
    assert g_after.abs().sum() > 0


@pytest.mark.parametrize("patchifier", ["linear", "unet"])
def test_cached_and_uncached_sampling_give_the_same_image(patchifier):
    model, loss = make_model(patchifier=patchifier)
    prompts = [[7, 8, 9], [10, 11]]  # different lengths: exercises left padding
    images = []
    for use_cache in (True, False):
        s = TransfusionSampler(model, SPECIAL, loss.diffusion, use_cache=use_cache)
        images.append(s.generate_images(prompts, guidance_scale=2.0, steps=4, seed=3))
    # fp32, same arithmetic except the attention's key ranges: agree to 1e-4 (relative; the
    # randomly initialised model's outputs are large)
    assert torch.allclose(images[0], images[1], rtol=1e-4, atol=1e-4), (
        (images[0] - images[1]).abs().max())


def _guided_sampler():
    """A tiny model's sampler and a function: (guidance scale, interval) -> images of two
    fixed prompts."""
    model, loss = make_model()
    s = TransfusionSampler(model, SPECIAL, loss.diffusion)
    return s, lambda scale, interval=None: s.generate_images(
        [[7, 8, 9], [10]], guidance_scale=scale, steps=4, seed=1, guidance_interval=interval)


def test_guidance_scale_one_equals_unguided():
    _, generate = _guided_sampler()
    guided, plain = generate(1.0), generate(None)
    # the unconditional stream rides in the same batch: it must not perturb the conditional one
    assert torch.allclose(guided, plain, atol=1e-5)
    assert not torch.allclose(generate(3.0), plain, atol=1e-3)


def test_guidance_interval_guides_only_the_steps_inside_it():
    s, generate = _guided_sampler()
    always, plain = generate(3.0), generate(None)
    # every sampler step has 0 < t/T <= 1
    assert torch.equal(generate(3.0, [0.0, 1.0]), always)
    # no step is that clean: the conditional stream alone
    assert torch.allclose(generate(3.0, [0.0, 1e-4]), plain, atol=1e-5)
    partial = generate(3.0, [0.0, 0.6])  # some steps guided, some not: neither extreme
    assert not torch.allclose(partial, always, atol=1e-3)
    assert not torch.allclose(partial, plain, atol=1e-3)


def test_guidance_interval_rule_and_bad_values():
    from fusion.models.diffusion import Diffusion

    d = Diffusion(DiffusionConfig(objective="flow", guidance_interval=[0.2, 0.8]))
    assert [d.guided(t) for t in (1000, 800, 500, 200, 100)] == [False, True, True, False, False]
    assert d.guided(1000, interval=[0.0, 1.0]) and Diffusion().guided(999)  # default: always
    for bad in ([0.5, 0.5], [0.8, 0.2], [-0.1, 0.5], [0.1, 1.5], [0.3]):
        with pytest.raises(ValueError, match="guidance_interval must be"):
            Diffusion(DiffusionConfig(guidance_interval=bad))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_tiny_model_overfits_one_batch_on_both_losses(objective):
    model, loss = make_model(caption_dropout=0.0, clean_image_share=0.0,
                             diffusion=DiffusionConfig(objective=objective))
    # Image-first documents: every text target is determined by its context (the caption by
    # its image), so the LM loss can reach ~0; caption-first ones start with an unpredictable
    # token after <bos>.
    batch = docs(4, image_first_every=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(120):
        # the same noise and timesteps every step: one batch to memorise
        out = loss(model, batch, encode, random.Random(0), torch.Generator().manual_seed(0))
        if first is None:
            first = {k: v.item() for k, v in out.items()}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["lm_loss"].item() < 0.1, out["lm_loss"]
    assert out["diffusion_loss"].item() < 0.3 * first["diffusion_loss"], (
        first["diffusion_loss"], out["diffusion_loss"].item())


def test_condition_images_are_never_noised_nor_scored():
    model, loss = make_model()
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    doc = Document((Image(src, is_condition=True), Text((7, 8)), Image(tgt)))
    seen = {}
    original = model.forward

    def spy(ids, layout, packed=None, latents=None, t=None, **kw):
        seen["latents"], seen["t"] = latents, t
        return original(ids, layout, packed, latents, t, **kw)
    model.forward = spy
    out = loss(model, [doc], encode, random.Random(0), torch.Generator().manual_seed(0))
    assert seen["t"][0] == 0 and torch.equal(seen["latents"][0], encode(src[None])[0])
    assert torch.isfinite(out["diffusion_loss"])


def test_diffusion_schedule_matches_the_paper():
    d = Diffusion()
    assert d.T == 1000 and d.cfg.objective == "ddpm"
    assert TransfusionLossConfig().diffusion_weight == 5.0


def test_token_sampling_is_accepted_and_ignored_for_images():
    """A family-agnostic caller passes Chameleon's code sampling; diffusion has no tokens."""
    from fusion.sampling.text import TokenSampling

    model, loss = make_model()
    s = TransfusionSampler(model, SPECIAL, loss.diffusion)
    plain = s.generate_images([[7, 8, 9]], guidance_scale=2.0, steps=2, seed=1)
    given = s.generate_images([[7, 8, 9]], guidance_scale=2.0, steps=2, seed=1,
                              sampling=TokenSampling(0.5, top_k=1))
    assert torch.equal(plain, given)


def _rows_and_loss(model, loss, batch):
    shapes = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    out = loss(model, batch, encode, random.Random(0), torch.Generator().manual_seed(0))
    handle.remove()
    return shapes[0], out


def test_pack_len_changes_the_rows_not_the_loss():
    # Attention never crosses documents and RoPE restarts per document, so shorter rows
    # (loss.pack_len) only drop masked-out work: every loss part is unchanged. Documents of
    # uneven length make first fit place later documents in earlier rows; each image must
    # still meet its own caption (a row-ordered slot numbering broke this; docs/results.md).
    g = torch.Generator().manual_seed(1)
    batch = []
    for i, n_text in enumerate([12, 9, 2, 1, 3, 12]):  # 20 + n_text positions each
        img = Image(torch.rand(3, 16, 16, generator=g) * 2 - 1)
        text = Text(tuple(int(x) for x in torch.randint(5, VOCAB, (n_text,), generator=g)))
        batch.append(Document((img, text) if i % 2 else (text, img)))
    model, default = make_model(caption_dropout=0.0)
    _, short = make_model(caption_dropout=0.0, pack_len=54)
    rows_default, out_default = _rows_and_loss(model, default, batch)
    rows_short, out_short = _rows_and_loss(model, short, batch)
    assert rows_default == (2, 96) and rows_short == (4, 54)
    from fusion.models.packing import pack
    pieces = [short.pieces(d, model.tokens_per_image, False) for d in batch]
    assert pack(pieces, 54, SPECIAL.pad).image_rows == [0, 1, 0, 1, 2, 3]  # first fit reorders
    for part in ("loss", "lm_loss", "diffusion_loss"):
        torch.testing.assert_close(out_short[part], out_default[part], atol=1e-5, rtol=1e-5)
    _, too_short = make_model(pack_len=20)
    with pytest.raises(ValueError, match="32 positions, more than max_len=20"):
        too_short(model, batch, encode, random.Random(0))


def test_bf16_encoder_output_is_noised_by_the_schedule_in_the_loss():
    """What TransfusionLoss feeds the model under bf16 autocast: with the VAE's latents in
    bf16 and t = 10 (cosine DDPM, √(1-ᾱ) = 0.027), each image carries noise of that std
    around √ᾱ·x0, and the diffusion loss is computed in float32."""
    model, loss = make_model(caption_dropout=0.0, clean_image_share=0.0)
    diff = loss.diffusion
    diff.sample_timesteps = lambda n, *a, **kw: torch.full((n,), 10, dtype=torch.long)
    batch = docs(4)
    seen = {}
    original = model.forward

    def spy(ids, layout, packed=None, latents=None, t=None, **kw):
        seen["latents"] = latents
        return original(ids, layout, packed, latents, t, **kw)
    model.forward = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(model, batch, lambda px: encode(px).bfloat16(), random.Random(0))
    abar = diff.ddpm.alphas_cumprod[10]
    pixels = torch.stack([s.pixels for d in batch for s in d.segments if isinstance(s, Image)])
    x0 = encode(pixels).bfloat16().float()
    residual = (seen["latents"] - abar.sqrt() * x0).flatten(1).std(1)
    assert seen["latents"].dtype == torch.float32
    assert torch.allclose(residual, (1 - abar).sqrt().expand(4), rtol=0.2), residual
    assert out["diffusion_loss"].dtype == torch.float32
