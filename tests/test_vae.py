"""VAETokenizer, stage-1 losses and the train_tokenizer entry point (tiny models, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusion.config import compose
from fusion.data.images import to_tensor
from fusion.data.sources import ShapesSource
from fusion.eval.reconstruction import evaluate_reconstruction
from fusion.image.losses import (
    AutoencoderLoss,
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
)
from fusion.image.schemas import AutoencoderLossConfig, TokenizerOptimConfig
from fusion.image.vae import (
    TokenizerLoadError,
    VAETokenizer,
    build_autoencoder,
    measure_latent_scaling,
)
from fusion.training.fusion_module import warmup_cosine
from fusion.training.tokenizer_module import (
    AutoencoderModule,
    ImageDataset,
    check_artifact_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every load here must work with the network disabled."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny(seed: int = 0, **kw) -> VAETokenizer:
    """f4, 4 channels, ~40k parameters."""
    torch.manual_seed(seed)
    kw = dict(block_out_channels=(16, 32, 32), norm_num_groups=8,
              mid_block_add_attention=False) | kw
    return VAETokenizer(build_autoencoder(**kw)).eval()


def images(n: int = 4, size: int = 32, offset: int = 0) -> torch.Tensor:
    src = ShapesSource(n, size=size, offset=offset)
    return torch.stack([to_tensor(src[i].image) for i in range(n)])


def test_shapes_and_geometry():
    tok = tiny()
    assert tok.downsample_factor == 4 and tok.latent_channels == 4
    assert tok.latent_grid(32) == (8, 8) and tok.latent_grid((32, 64)) == (8, 16)
    x = images(2)
    with torch.no_grad():
        z = tok.encode(x)
        assert z.shape == (2, 4, 8, 8)
        assert tok.decode(z).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="not divisible"):
        tok.latent_grid(30)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        tok.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected latents \(B, 4, h, w\)"):
        tok.decode(torch.zeros(2, 3, 8, 8))


@torch.no_grad()
def test_scaling_is_applied_on_encode_and_undone_on_decode():
    tok, x = tiny(), images(4)
    tok.set_scaling(0.37, 2.5, "test")
    raw = tok.autoencoder.encode(x).latent_dist.mean
    assert torch.equal(tok.encode(x), (raw - tok.shift) * tok.scale)
    lat = torch.randn(2, 4, 8, 8)
    assert torch.equal(tok.decode(lat),
                       tok.autoencoder.decode(lat / tok.scale + tok.shift).sample)
    assert tok.autoencoder.config.scaling_factor == 2.5  # the diffusers config agrees
    # measured: shift = mean, scale = 1/std of the raw latents of these images
    shift, scale, used = measure_latent_scaling(tok, [x[:2], x[2:]])
    assert used == 4
    assert shift == pytest.approx(raw.double().mean().item(), rel=1e-6)
    assert scale == pytest.approx(1 / raw.double().std(unbiased=False).item(), rel=1e-5)
    z = tok.encode(x)
    assert abs(z.mean().item()) < 1e-5 and z.std(unbiased=False).item() == pytest.approx(1, 1e-4)
    assert "measured" in tok.info["scaling"]


@torch.no_grad()
def test_save_then_load_gives_identical_outputs(tmp_path):
    tok, x = tiny(), images(2)
    tok.set_scaling(0.1, 3.0, "test")
    tok.info["note"] = "kept"
    tok.save_pretrained(tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
    loaded = VAETokenizer.from_pretrained(tmp_path / "art")
    assert torch.equal(loaded.encode(x), tok.encode(x))
    z = tok.encode(x)
    assert torch.equal(loaded.decode(z), tok.decode(z))
    assert float(loaded.scale) == 3.0 and loaded.info["note"] == "kept"
    cfg = json.loads((tmp_path / "art" / "config.json").read_text())
    assert cfg["format"] == "fusion.vae" and cfg["downsample_factor"] == 4


@torch.no_grad()
def test_loads_a_diffusers_vae_offline_from_folder_and_single_file(tmp_path):
    tok, x = tiny(), images(2)
    tok.autoencoder.register_to_config(scaling_factor=0.5)
    tok.autoencoder.save_pretrained(tmp_path / "sd-vae")  # what a user copies from SD/FLUX
    assert (tmp_path / "sd-vae" / "diffusion_pytorch_model.safetensors").exists()
    want = tok.autoencoder.decode(tok.autoencoder.encode(x).latent_dist.mean).sample

    folder = VAETokenizer.from_pretrained(tmp_path / "sd-vae")
    assert float(folder.scale) == 0.5 and "not yet measured" in folder.info["scaling"]
    assert torch.equal(folder.decode(folder.encode(x)), want)

    single = tmp_path / "vae.safetensors"
    save_file(dict(tok.autoencoder.state_dict()), str(single))
    one = VAETokenizer.from_pretrained(single, config=tmp_path / "sd-vae" / "config.json")
    assert torch.equal(one.decode(one.encode(x)), want)
    with pytest.raises(TokenizerLoadError, match="needs config="):
        VAETokenizer.from_pretrained(single)


def test_missing_or_corrupt_artifacts_fail_naming_the_file(tmp_path):
    tok = tiny()
    art = tok.save_pretrained(tmp_path / "art")
    with pytest.raises(TokenizerLoadError, match="nowhere: no such tokenizer folder"):
        VAETokenizer.from_pretrained(tmp_path / "nowhere")

    weights = art / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(TokenizerLoadError, match=r"model\.safetensors: corrupt"):
        VAETokenizer.from_pretrained(art)
    weights.unlink()
    with pytest.raises(TokenizerLoadError, match=r"model\.safetensors: missing"):
        VAETokenizer.from_pretrained(art)
    weights.write_bytes(good)

    cfg_path = art / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(TokenizerLoadError, match=r"config\.json: not valid JSON"):
        VAETokenizer.from_pretrained(art)
    cfg_path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(TokenizerLoadError, match=r"config\.json: neither a fusion VAE"):
        VAETokenizer.from_pretrained(art)
    wider = dict(cfg, autoencoder=dict(cfg["autoencoder"], block_out_channels=[16, 32, 64]))
    cfg_path.write_text(json.dumps(wider))
    with pytest.raises(TokenizerLoadError, match=r"model\.safetensors: weights do not fit"):
        VAETokenizer.from_pretrained(art)
    cfg_path.unlink()
    with pytest.raises(TokenizerLoadError, match=r"config\.json: missing"):
        VAETokenizer.from_pretrained(art)
    pickled = tmp_path / "vae.ckpt"
    pickled.write_bytes(b"not loaded")
    with pytest.raises(TokenizerLoadError, match=r"vae\.ckpt: only \.safetensors"):
        VAETokenizer.from_pretrained(pickled)


def test_adaptive_weight_is_finite_with_zero_adversarial_gradient():
    last = torch.nn.Parameter(torch.randn(3, 8, 3, 3))
    rec = (last * 2).square().mean()
    zero_grad = (last * 0).sum()  # reaches the layer, gradient exactly 0
    w = adaptive_weight(rec, zero_grad, last, max_weight=1e4)
    assert torch.isfinite(w) and 0 < w <= 1e4
    unused = torch.tensor(1.0, requires_grad=True) * 3  # does not reach the layer at all
    assert torch.isfinite(adaptive_weight(rec, unused, last))
    g = (last * 5).sum()
    expected = torch.autograd.grad(rec, last, retain_graph=True)[0].norm() / (
        torch.full_like(last, 5).norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, g, last), expected)


def test_patchgan_and_hinge():
    d = NLayerDiscriminator(channels=8, n_layers=2)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    big, small = torch.full((4,), 5.0), torch.full((4,), -5.0)
    assert hinge_d_loss(big, small) == 0  # confident and right: no loss
    assert hinge_d_loss(small, big) == 6.0


def test_tiny_vae_overfits_one_batch():
    tok, x = tiny(), images(4)
    tok.train()
    loss_fn = AutoencoderLoss(AutoencoderLossConfig())
    opt = torch.optim.AdamW(tok.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        recon, aux = tok(x)
        loss, _ = loss_fn.generator_loss(x, recon, aux, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses[::8]


def test_module_trains_with_the_gan_on(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    tok = tiny().train()
    loss = AutoencoderLossConfig(disc_weight=0.5, disc_start=1, disc_channels=8, disc_layers=2)
    module = AutoencoderModule(tok, loss, TokenizerOptimConfig(warmup_steps=1),
                               image_log_every=2, image_dir=tmp_path / "images",
                               metrics_every=1)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    trainer.fit(module, DataLoader(list(images(8)), batch_size=4))
    assert module.batches_done < 6  # max_steps counts G and D steps once the GAN is on
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/d_loss"]) and torch.isfinite(logged["train/psnr"])
    assert (tmp_path / "images" / "step0000000.png").exists()


def test_evaluate_reconstruction_reports_the_figures():
    tok = tiny()
    out = evaluate_reconstruction(tok, ShapesSource(6, size=32, offset=100), n=5, batch_size=4)
    assert out["images"] == 5 and set(out) >= {"psnr", "ssim", "attribute_accuracy"}
    assert 0 <= out["attribute_accuracy"] <= 1


def test_configs_compose_and_typos_fail():
    cfg = compose("train_tokenizer", ["debug=default"])
    assert cfg.tokenizer.name == "shapes-vae" and cfg.trainer.max_steps == 4
    assert cfg.trainer.gradient_clip_val is None
    assert compose("train_tokenizer").trainer.max_steps > 100
    with pytest.raises(Exception, match="block_out_chanels"):
        compose("train_tokenizer", ["tokenizer.autoencoder.block_out_chanels=[8]"])
    cfg = compose("train_tokenizer", ["tokenizer=vae_pretrained", "tokenizer.pretrained=/x"])
    assert cfg.tokenizer.pretrained == "/x"


def test_training_crops_stay_on_the_latent_grid():
    src = ShapesSource(3, size=64)
    full = to_tensor(src[0].image)
    torch.manual_seed(0)
    for _ in range(10):
        crop = ImageDataset(src, crop=32, align=8)[0]
        assert crop.shape == (3, 32, 32)
        hits = [(y, x) for y in range(0, 33, 8) for x in range(0, 33, 8)
                if torch.equal(full[:, y:y + 32, x:x + 32], crop)]
        assert hits, "a crop must start on a multiple of 8"
    assert ImageDataset(src)[0].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="multiple of the downsampling factor 8"):
        ImageDataset(src, crop=20, align=8)[0]


def test_keyed_crops_depend_on_the_key_alone():
    ds = ImageDataset(ShapesSource(3, size=64), crop=32, align=8, seed=0)
    first = ds[(0, 1, 2)]  # (epoch, batch, index)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(ds[(0, 1, 2)], first)
    windows = {ds[(epoch, 0, 2)].sum().item() for epoch in range(8)}
    assert len(windows) > 1  # another epoch, another window


def test_image_batches_resume_where_a_checkpoint_left_them():
    from fusion.training.tokenizer_module import ImageDataModule

    cfg = compose("train_tokenizer", ["debug=default", "data.num_train=24", "data.image_size=32",
                                      "tokenizer.train_crop=16"])

    def epoch(data, number):  # what Lightning does at an epoch's start
        data.setup()
        loader = data.train_dataloader()
        data.train_sampler.set_epoch(number)
        return list(loader)

    data = ImageDataModule(cfg.data, train_crop=16, crop_align=8)
    straight = epoch(data, 0) + epoch(data, 1)  # 3 batches an epoch
    again = ImageDataModule(cfg.data, train_crop=16, crop_align=8)
    again.resume_at(1, 1)  # a checkpoint after the 1st batch of epoch 1
    resumed = epoch(again, 1)
    assert len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed, strict=True))
    assert not torch.equal(straight[0], straight[3])  # another epoch, another order and crops


def test_schedule_warms_up_then_follows_the_larger_of_steps_and_time():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    # a wall-clock budget that is 100 % spent ends the cosine whatever the step
    assert warmup_cosine(20, 10, 100, 0.1, progress=1.0) == pytest.approx(0.1)


def test_artifact_guard(tmp_path):
    tiny().save_pretrained(tmp_path / "art")
    with pytest.raises(FileExistsError, match="tokenizer.overwrite=true"):
        check_artifact_dir(tmp_path / "art", overwrite=False)
    assert check_artifact_dir(tmp_path / "art", overwrite=True) == tmp_path / "art"


def test_train_tokenizer_script_debug_end_to_end(tmp_path):
    out, art = tmp_path / "run", tmp_path / "art"
    proc = subprocess.run(
        [sys.executable, "scripts/train_tokenizer.py", "debug=default", f"output_dir={out}",
         f"tokenizer.artifact_dir={art}", "data.image_size=32",
         "tokenizer.autoencoder.block_out_channels=[16,32,32]",
         "tokenizer.autoencoder.norm_num_groups=8", "tokenizer.image_log_every=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in art.iterdir()) == ["card.md", "config.json",
                                                     "model.safetensors"]
    tok = VAETokenizer.from_pretrained(art)
    assert tok.info["train_steps"] == 4 and "measured" in tok.info["scaling"]
    assert tok.info["heldout"]["images"] == 16
    card = (art / "card.md").read_text()
    assert "held-out PSNR" in card and "debug=default" in card
    assert list((out / "images").glob("*.png"))
    assert tok.encode(images(1)).shape == (1, 4, 8, 8)
