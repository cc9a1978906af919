"""VQTokenizer (VQ-GAN with vq / fsq / lfq quantisers), its artifact and its training path
(tiny models, 32×32 images, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fusion.config import compose
from fusion.data.images import to_tensor
from fusion.data.sources import ShapesSource
from fusion.image.artifacts import TokenizerLoadError
from fusion.image.losses import AutoencoderLoss, adaptive_weight
from fusion.image.schemas import (
    AutoencoderLossConfig,
    TokenizerOptimConfig,
    VQGANTokenizerConfig,
)
from fusion.image.vqgan import (
    VQTokenizer,
    build_vqgan_tokenizer,
    codebook_stats,
    evaluate_codes,
)
from fusion.training.tokenizer_module import AutoencoderModule, build_image_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "tokenizers" / "shapes-vqgan"
QUANTIZERS = {  # the tiny configs' quantiser blocks, as VQGANTokenizerConfig builds them
    "vq": {"kind": "vq", "codebook_size": 64, "codebook_dim": 8, "use_cosine_sim": True,
           "decay": 0.8, "commitment_weight": 0.25, "threshold_ema_dead_code": 2.0},
    "fsq": {"kind": "fsq", "levels": [8, 5, 5, 5]},
    "lfq": {"kind": "lfq", "codebook_size": 64, "entropy_loss_weight": 0.1,
            "commitment_loss_weight": 0.25},
}


# Tiny networks gain nothing from a second thread on a shared CPU (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kind: str = "fsq", seed: int = 0, attention: bool = False,
         norm: str = "group") -> VQTokenizer:
    """f4 (32 px -> 8×8 codes), 16 latent channels, ~0.25 M parameters."""
    torch.manual_seed(seed)
    ae = {"block_out_channels": [16, 32, 32], "norm_num_groups": 8, "latent_channels": 16,
          "mid_block_add_attention": attention, "norm": norm}
    return VQTokenizer(ae, QUANTIZERS[kind]).eval()


def images(n: int = 4, size: int = 32, offset: int = 0) -> torch.Tensor:
    src = ShapesSource(n, size=size, offset=offset)
    return torch.stack([to_tensor(src[i].image) for i in range(n)])


@pytest.mark.parametrize("kind", ["vq", "fsq", "lfq"])
@torch.no_grad()
def test_shapes_dtypes_and_eval_round_trip(kind):
    tok, x = tiny(kind, attention=kind == "vq"), images(3)
    k = {"vq": 64, "fsq": 1000, "lfq": 64}[kind]
    assert tok.codebook_size == k and tok.downsample_factor == 4
    assert tok.latent_grid(32) == (8, 8) and tok.latent_grid((32, 64)) == (8, 16)
    codes = tok.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < k
    out = tok.decode(codes)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    # Deterministic in eval mode, and decode(encode(x)) is exactly the forward pass.
    assert torch.equal(tok.encode(x), codes) and torch.equal(tok.decode(codes), out)
    recon, aux = tok(x)
    assert torch.equal(recon, out)
    assert set(aux) == (set() if kind == "fsq" else {"codebook"})
    # Re-encoding the reconstruction is stable too (same input -> same codes).
    assert torch.equal(tok.encode(out.clamp(-1, 1)), tok.encode(out.clamp(-1, 1)))


@torch.no_grad()
def test_bad_inputs_fail_clearly():
    tok = tiny()
    with pytest.raises(ValueError, match="not divisible"):
        tok.latent_grid(30)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        tok.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="integer codes"):
        tok.decode(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1000\)"):
        tok.decode(torch.full((1, 8, 8), 1000))
    with pytest.raises(ValueError, match="unknown quantizer kind 'rvq'"):
        VQTokenizer(quantizer={"kind": "rvq"})
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        VQTokenizer({"block_out_channels": [24, 32], "norm_num_groups": 16})


def test_encode_never_moves_the_vq_codebook():
    tok, x = tiny("vq").train(), images(4)
    before = tok.quantizer.q.codebook.clone()
    with torch.no_grad():
        tok.encode(x)  # train mode, but encoding must not touch the EMA codebook
    assert torch.equal(tok.quantizer.q.codebook, before)
    with torch.no_grad():
        tok(x)  # the training pass does
    assert not torch.equal(tok.quantizer.q.codebook, before)


@pytest.mark.parametrize("kind", ["vq", "fsq", "lfq"])
def test_each_quantizer_trains(kind):
    tok, x = tiny(kind).train(), images(4)
    loss_fn = AutoencoderLoss(AutoencoderLossConfig())
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    start = {k: v.clone() for k, v in tok.state_dict().items()}
    losses = []
    for _ in range(6):
        recon, aux = tok(x)
        loss, logs = loss_fn.generator_loss(x, recon, aux, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    after = tok.state_dict()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        assert not torch.equal(after[name], start[name]), name
    if kind == "vq":  # the EMA codebook moved and the projection into it learnt
        assert not torch.equal(after["quantizer.q._codebook.embed"],
                               start["quantizer.q._codebook.embed"])
        assert not torch.equal(after["quantizer.q.project_in.weight"],
                               start["quantizer.q.project_in.weight"])
    stats = tok.pop_code_stats()
    assert 0 < stats["codebook_usage"] <= 1 and stats["codebook_perplexity"] >= 1
    assert tok.pop_code_stats() == {}  # a new window starts empty


def test_codebook_stats():
    s = codebook_stats(torch.tensor([5, 5, 0, 0]))
    assert s["codebook_usage"] == 0.5 and s["codebook_perplexity"] == pytest.approx(2.0)
    assert codebook_stats(torch.tensor([1, 1, 1, 1]))["codebook_perplexity"] == pytest.approx(4)
    assert codebook_stats(torch.zeros(4)) == {}
    out = evaluate_codes(tiny(), ShapesSource(6, size=32, offset=50), n=5, batch_size=2)
    assert out["codes_per_image"] == 64 and out["codebook_size"] == 1000
    assert 0 < out["codebook_usage"] <= 1


@pytest.mark.parametrize("kind", ["vq", "fsq", "lfq"])
@torch.no_grad()
def test_save_then_load_gives_identical_codes(tmp_path, kind):
    tok, x = tiny(kind), images(3)
    tok.train()
    tok(x)  # move the VQ codebook off its initial values: the buffers must be saved
    tok.eval()
    tok.info["note"] = "kept"
    tok.save_pretrained(tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
    loaded = VQTokenizer.from_pretrained(tmp_path / "art")
    assert not loaded.training and loaded.info["note"] == "kept"
    codes = tok.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))
    cfg = json.loads((tmp_path / "art" / "config.json").read_text())
    assert cfg["kind"] == "vqgan" and cfg["quantizer"]["kind"] == kind
    assert cfg["codebook_size"] == tok.codebook_size and cfg["downsample_factor"] == 4

    from fusion.families import load_image_tokenizer

    assert isinstance(load_image_tokenizer(str(tmp_path / "art")), VQTokenizer)


def test_load_image_tokenizer_still_reads_a_vae(tmp_path):
    from fusion.families import load_image_tokenizer
    from fusion.image.vae import VAETokenizer, build_autoencoder

    vae = VAETokenizer(build_autoencoder((16, 32), norm_num_groups=8,
                                         mid_block_add_attention=False))
    vae.save_pretrained(tmp_path / "vae")
    assert isinstance(load_image_tokenizer(str(tmp_path / "vae")), VAETokenizer)


def test_missing_or_corrupt_artifacts_fail_naming_the_file(tmp_path):
    art = tiny("vq").save_pretrained(tmp_path / "art")
    with pytest.raises(TokenizerLoadError, match="nowhere: no such tokenizer folder"):
        VQTokenizer.from_pretrained(tmp_path / "nowhere")

    weights = art / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(TokenizerLoadError, match=r"model\.safetensors: corrupt"):
        VQTokenizer.from_pretrained(art)
    weights.unlink()
    with pytest.raises(TokenizerLoadError, match=r"model\.safetensors: missing"):
        VQTokenizer.from_pretrained(art)
    weights.write_bytes(good)

    cfg_path = art / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(TokenizerLoadError, match=r"config\.json: not valid JSON"):
        VQTokenizer.from_pretrained(art)
    cfg_path.write_text(json.dumps({**cfg, "kind": "vae"}))
    with pytest.raises(TokenizerLoadError, match=r"config\.json: not a fusion VQ-GAN"):
        VQTokenizer.from_pretrained(art)
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantizer"}))
    with pytest.raises(TokenizerLoadError, match=r"config\.json: missing .* 'quantizer'"):
        VQTokenizer.from_pretrained(art)
    cfg_path.write_text(json.dumps({**cfg, "quantizer": {"kind": "vq", "codebook_sise": 8}}))
    with pytest.raises(TokenizerLoadError, match=r"config\.json: bad model config"):
        VQTokenizer.from_pretrained(art)
    bigger = {**cfg, "quantizer": {**cfg["quantizer"], "codebook_size": 128}}
    cfg_path.write_text(json.dumps(bigger))
    with pytest.raises(TokenizerLoadError, match=r"model\.safetensors: weights do not fit"):
        VQTokenizer.from_pretrained(art)
    cfg_path.unlink()
    with pytest.raises(TokenizerLoadError, match=r"config\.json: missing"):
        VQTokenizer.from_pretrained(art)


def test_adaptive_weight_is_finite_when_the_adversarial_gradient_is_zero():
    tok, x = tiny().train(), images(2)
    recon, aux = tok(x)
    rec = (recon - x).abs().mean()
    g_zero = (recon * 0).sum()  # reaches the decoder's last layer with gradient exactly 0
    w = adaptive_weight(rec, g_zero, tok.last_layer)
    assert torch.isfinite(w) and 0 < w <= 1e4
    # Through the real loss: a discriminator whose output ignores its input.
    loss_fn = AutoencoderLoss(AutoencoderLossConfig(disc_weight=0.5, disc_start=0,
                                                    disc_channels=8, disc_layers=2)).train()
    torch.nn.init.zeros_(loss_fn.discriminator.net[-1].weight)
    total, logs = loss_fn.generator_loss(x, recon, aux, step=0, last_layer=tok.last_layer)
    assert torch.isfinite(total) and torch.isfinite(logs["adaptive_weight"])


def test_module_starts_the_discriminator_at_its_step_and_logs_codebook_usage():
    class Watch(L.Callback):
        def __init__(self):
            self.d_moved, self.d0 = [], None

        def on_train_start(self, trainer, module):
            self.d0 = [p.detach().clone() for p in module.loss.discriminator.parameters()]

        def on_train_batch_end(self, trainer, module, *args):
            now = list(module.loss.discriminator.parameters())
            self.d_moved.append(any(not torch.equal(a, b)
                                    for a, b in zip(now, self.d0, strict=True)))

    tok, watch = tiny("vq"), Watch()
    loss = AutoencoderLossConfig(disc_weight=0.5, disc_start=2, disc_channels=8, disc_layers=2)
    module = AutoencoderModule(tok, loss, TokenizerOptimConfig(warmup_steps=1),
                               image_log_every=0, metrics_every=1)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[watch])
    trainer.fit(module, DataLoader(list(images(8)), batch_size=2))
    # Batches 0 and 1 update only the generator; from batch 2 on D takes a step per batch
    # (max_steps=6 optimiser steps: 2 G-only batches, then 2 G+D batches).
    assert watch.d_moved == [False, False, True, True]
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/d_loss"]) and torch.isfinite(logged["train/codebook"])
    assert 0 < logged["train/codebook_usage"] <= 1
    assert logged["train/codebook_perplexity"] >= 1


def test_configs_compose_build_each_quantizer_and_typos_fail():
    for kind, size in (("vq", 1024), ("fsq", 1000), ("lfq", 1024)):
        cfg = compose("train_tokenizer", ["tokenizer=vqgan_tiny",
                                          f"tokenizer.quantizer.kind={kind}"])
        assert cfg.tokenizer.kind == "vqgan"
        tok = build_image_tokenizer(cfg.tokenizer)
        assert isinstance(tok, VQTokenizer) and tok.codebook_size == size
        assert tok.downsample_factor == 8 and tok.latent_grid(64) == (8, 8)
    assert build_vqgan_tokenizer(VQGANTokenizerConfig()).codebook_size == 1000
    with pytest.raises(Exception, match="levles"):
        compose("train_tokenizer", ["tokenizer=vqgan_tiny", "tokenizer.quantizer.fsq.levles=[8]"])
    with pytest.raises(Exception, match="kl_weigth"):
        compose("train_tokenizer", ["tokenizer=vqgan_tiny", "tokenizer.loss.kl_weigth=1"])


def test_train_tokenizer_script_debug_end_to_end(tmp_path):
    out, art = tmp_path / "run", tmp_path / "art"
    proc = subprocess.run(
        [sys.executable, "scripts/train_tokenizer.py", "tokenizer=vqgan_tiny", "debug=default",
         f"output_dir={out}", f"tokenizer.artifact_dir={art}", "data.image_size=32",
         "data.num_val=8", "tokenizer.autoencoder.block_out_channels=[16,32,32]",
         "tokenizer.autoencoder.norm_num_groups=8", "tokenizer.autoencoder.latent_channels=16",
         "tokenizer.quantizer.kind=vq", "tokenizer.image_log_every=2", "trainer.max_steps=2",
         "trainer.limit_val_batches=1", "callbacks.progress_bar=none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in art.iterdir()) == ["card.md", "config.json",
                                                     "model.safetensors"]
    tok = VQTokenizer.from_pretrained(art)
    assert tok.info["train_steps"] == 2 and tok.info["heldout"]["images"] == 8
    assert 0 < tok.info["heldout"]["codebook_usage"] <= 1
    card = (art / "card.md").read_text()
    assert "codebook usage" in card and "VQTokenizer.from_pretrained" in card
    assert list((out / "images").glob("*.png"))
    assert tok.encode(images(1)).shape == (1, 8, 8)


def load_shipped(name: str) -> VQTokenizer:
    """A committed artifact under tokenizers/, loaded as the Chameleon family loads it."""
    from fusion.families import load_image_tokenizer

    if not (SHIPPED.parent / name).exists():
        pytest.skip(f"tokenizers/{name} not trained yet")
    return load_image_tokenizer(f"tokenizers/{name}")


# PSNR floors a few dB under what each shipped artifact gives on these 16 held-out scenes
# (33.5 dB / 37.3 dB; their cards: 35.5 / 39.4 dB on 512).
@pytest.mark.parametrize("name, min_psnr", [("shapes-vqgan", 31.0), ("shapes-vqgan-local", 35.0)])
@torch.no_grad()
def test_shipped_artifact_reconstructs_and_its_codes_are_stable(name, min_psnr):
    tok = load_shipped(name)
    assert isinstance(tok, VQTokenizer) and not tok.training
    assert tok.codebook_size <= 1024 and tok.latent_grid(64) == (8, 8)
    x = images(16, size=64, offset=20000)  # held-out scenes
    codes = tok.encode(x)
    recon = tok.decode(codes).clamp(-1, 1)
    psnr = -10 * torch.log10(((recon - x) / 2).square().mean())
    assert psnr > min_psnr, float(psnr)
    # Re-encoding a reconstruction gives back most of its codes (81-82 % on these 16: the
    # codes of background cells also carry their neighbours' objects, which the
    # reconstruction only approximates), and does so deterministically.
    again = tok.encode(recon)
    assert (again == codes).float().mean() > 0.7
    assert torch.equal(tok.encode(recon), again)


@torch.no_grad()
def test_shipped_local_artifact_keeps_codes_beyond_its_receptive_field():
    """The GPU-trained `vqgan_local` artifact: a white 8-px corner on a 128-px image (16×16
    codes) leaves every code from the fourth cell on bit for bit (its encoder's receptive
    field reaches three cells), which is what a Chameleon edit model relies on."""
    tok = load_shipped("shapes-vqgan-local")
    assert tok.autoencoder_config["norm"] == "batch"
    x = images(2, size=128)
    edited = x.clone()
    edited[:, :, :8, :8] = 1.0
    before, after = tok.encode(x), tok.encode(edited)
    assert before.shape == (2, 16, 16)
    assert torch.equal(before[:, 4:, 4:], after[:, 4:, 4:])
    assert not torch.equal(before[:, :2, :2], after[:, :2, :2])  # the edit itself is seen


# -- local codes (autoencoder.norm=batch, conf/tokenizer/vqgan_local.yaml) -------------------
@torch.no_grad()
def test_running_norm_makes_codes_local():
    """Change one corner of a 128-px image (32×32 codes at f4): with batch norms (fixed
    statistics when encoding) and no attention, the encoder's features outside that corner's
    receptive field are bit-for-bit unchanged; with GroupNorm (statistics over the whole
    image) they all move."""
    x = images(2, size=128)
    edited = x.clone()
    edited[:, :, :8, :8] = 1.0  # a white top-left corner
    far = (slice(None), slice(None), slice(16, None), slice(16, None))  # codes 16.. of 32
    local = tiny(norm="batch")
    assert torch.equal(local.encoder(x)[far], local.encoder(edited)[far])
    assert torch.equal(local.encode(x)[:, 16:, 16:], local.encode(edited)[:, 16:, 16:])
    grouped = tiny()
    moved = (grouped.encoder(x)[far] - grouped.encoder(edited)[far]).abs()
    assert (moved > 0).float().mean() > 0.9


def test_running_norm_trains_on_batch_statistics_and_round_trips(tmp_path):
    from fusion.image.vqgan import RunningNorm

    norm = RunningNorm(6)
    x = torch.randn(4, 6, 5, 7) * 3 + 1
    y = norm(x)  # train mode: per channel over (batch, positions)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(6), atol=1e-5)
    assert torch.allclose(norm.running_mean, 0.1 * x.mean((0, 2, 3)), atol=1e-5)
    assert norm(torch.randn(2, 6, 9)).shape == (2, 6, 9)  # attention's (B, C, L) too
    with pytest.raises(ValueError, match="expects \\(B, C, ...\\) feature maps"):
        norm(torch.randn(2, 6))
    tok, x = tiny(norm="batch"), images(3)
    tok.train()
    tok(x)  # moves the running statistics: they are part of the artifact
    tok.eval()
    assert not torch.equal(tok.encoder.conv_norm_out.running_mean,
                           torch.zeros_like(tok.encoder.conv_norm_out.running_mean))
    tok.save_pretrained(tmp_path / "local")
    loaded = VQTokenizer.from_pretrained(tmp_path / "local")
    assert loaded.autoencoder_config["norm"] == "batch"
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    with pytest.raises(ValueError, match="unknown autoencoder norm 'layer'"):
        tiny(norm="layer")


def test_local_config_composes_without_groupnorm_in_the_encoder():
    cfg = compose("train_tokenizer", ["tokenizer=vqgan_local"])
    tok = build_vqgan_tokenizer(cfg.tokenizer)
    assert cfg.tokenizer.name == "shapes-vqgan-local"
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in tok.encoder.modules())
    assert tok.autoencoder_config["mid_block_add_attention"] is False
