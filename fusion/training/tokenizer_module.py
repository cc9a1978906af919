"""Stage 1: train an image autoencoder (the VAE now, the VQ-GAN later) with Lightning.

:class:`AutoencoderModule` takes any network with the stage-1 interface

    forward(images (B, 3, H, W) in [-1, 1]) -> (reconstruction (B, 3, H, W), aux: dict)
    last_layer -> the decoder's output weight (for the adaptive GAN weight)

plus the loss and optimiser configs, and alternates generator and discriminator updates by
manual optimisation (as taming-transformers does with its two optimisers). With the GAN off
it is one AdamW step per batch.

Note on steps: Lightning counts every optimiser step in ``global_step``, so with the
discriminator on, ``trainer.max_steps`` covers 2 steps per batch. The schedule and
``disc_start`` count batches, not optimiser steps.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.config import DataConfig
from fusion.data.images import save_grid, to_tensor, to_uint8
from fusion.image.losses import AutoencoderLoss, image_metrics
from fusion.image.schemas import AutoencoderLossConfig, OptimConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Data: images only
# --------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """A record source (``source[i].image``: uint8 (H, W, 3)) -> float (3, H, W) in [-1, 1]."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(self.source[i].image)


class ImageDataModule(L.LightningDataModule):
    """The images of ``build_caption_sources(cfg)`` (captions unused): batches (B, 3, H, W)."""

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.train_source = self.val_source = None

    def setup(self, stage: str | None = None) -> None:
        from fusion.data.datamodule import build_caption_sources

        if self.train_source is None:
            self.train_source, self.val_source = build_caption_sources(self.cfg)

    def _loader(self, source, shuffle: bool) -> DataLoader:
        return DataLoader(ImageDataset(source), batch_size=self.cfg.batch_size,
                          shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_source, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_source, shuffle=False)

    def image_batches(self, split: str, n: int, batch_size: int = 64):
        """The first ``n`` images of a split, in order, as (B, 3, H, W) batches."""
        self.setup()
        source = self.train_source if split == "train" else self.val_source
        n = min(n, len(source))
        for start in range(0, n, batch_size):
            yield torch.stack([to_tensor(source[i].image)
                               for i in range(start, min(start + batch_size, n))])


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float,
                  progress: float | None = None) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``min_ratio``
    at ``total`` (Loshchilov & Hutter 2017, SGDR, without restarts). ``progress`` in [0, 1]
    overrides the step-based position on the cosine (used for a wall-clock budget)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class AutoencoderModule(L.LightningModule):
    """Trains ``autoencoder`` (stage-1 interface above) against :class:`AutoencoderLoss`."""

    def __init__(self, autoencoder: nn.Module, loss: AutoencoderLossConfig, optim: OptimConfig,
                 image_log_every: int = 500, image_dir: str | Path | None = None,
                 metrics_every: int = 10):
        super().__init__()
        self.automatic_optimization = False  # G and D alternate (taming's two optimisers)
        self.autoencoder = autoencoder
        self.loss = AutoencoderLoss(loss)
        self.optim_cfg = optim
        self.image_log_every = image_log_every
        self.image_dir = Path(image_dir) if image_dir else None
        self.metrics_every = max(1, metrics_every)
        self.batches_done = 0  # batches, not optimiser steps (see module docstring)
        self._clock: float | None = None  # monotonic start of training (time budget)

    # ---- optimisers ----------------------------------------------------------------------
    def _total_batches(self) -> int:
        n_opt = 2 if self.loss.discriminator is not None else 1
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return max(1, self.trainer.max_steps // n_opt)
        return max(1, int(self.trainer.estimated_stepping_batches))

    def configure_optimizers(self):
        c = self.optim_cfg
        total = self._total_batches()

        def make(params, lr):
            opt = torch.optim.AdamW(params, lr=lr, betas=tuple(c.betas),
                                    weight_decay=c.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_cosine(s, c.warmup_steps, total, c.min_lr_ratio,
                                             self._progress(s, total)))
            return opt, {"scheduler": sched, "interval": "step"}

        opt_g, sched_g = make(self.autoencoder.parameters(), c.lr)
        if self.loss.discriminator is None:
            return [opt_g], [sched_g]
        opt_d, sched_d = make(self.loss.discriminator.parameters(),
                              c.lr * self.loss.cfg.disc_lr_scale)
        return [opt_g, opt_d], [sched_g, sched_d]

    def _elapsed(self) -> float:
        return 0.0 if self._clock is None else time.monotonic() - self._clock

    def _progress(self, step: int, total: int) -> float | None:
        """Position on the cosine: the larger of the step and wall-clock fractions."""
        budget = self.optim_cfg.time_budget_s
        if not budget:
            return None
        warm = self.optim_cfg.warmup_steps
        return max((step - warm) / max(1, total - warm), self._elapsed() / budget)

    def _step(self, opt, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.optim_cfg.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.optim_cfg.grad_clip,
                                gradient_clip_algorithm="norm")
        opt.step()

    # ---- steps ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Lightning keeps each submodule's mode; a loaded tokenizer arrives in eval mode.
        self.train()
        self._clock = time.monotonic()
        if self.loss.perceptual is not None:
            self.loss.perceptual.eval()  # a frozen feature net: no dropout

    def training_step(self, images: torch.Tensor, batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        step = self.batches_done

        recon, aux = self.autoencoder(images)
        g_loss, logs = self.loss.generator_loss(images, recon, aux, step,
                                                getattr(self.autoencoder, "last_layer", None))
        self._step(optimizers[0], g_loss)
        schedulers[0].step()
        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(images, recon)
            self._step(optimizers[1], d_loss)
            schedulers[1].step()  # D's warm-up starts when D does (at disc_start)
            logs.update(d_logs)
        self.batches_done += 1
        budget = self.optim_cfg.time_budget_s
        if budget and self._elapsed() >= budget:
            self.trainer.should_stop = True  # the cosine has reached its end

        if step % self.metrics_every == 0:  # SSIM is not free; every few batches is plenty
            logs.update(image_metrics(recon, images))
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True,
                      prog_bar=False, batch_size=images.shape[0])
        self.log("loss", logs["loss"], prog_bar=True, logger=False)
        if "psnr" in logs:
            self.log("psnr", logs["psnr"], prog_bar=True, logger=False)
        if self.image_log_every and step % self.image_log_every == 0:
            self.log_images(images, recon, f"step{step:07d}")

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        recon, aux = self.autoencoder(images)  # eval mode: the posterior mean
        _, logs = self.loss.generator_loss(images, recon, aux, self.batches_done)
        logs.update(image_metrics(recon, images))
        self.log_dict({f"val/{k}": v for k, v in logs.items() if k in
                       ("loss", "rec", "l1", "l2", "kl", "psnr", "ssim")},
                      batch_size=images.shape[0])

    # ---- images --------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, images: torch.Tensor, recon: torch.Tensor, name: str,
                   n: int = 8) -> Path | None:
        """Originals (top row) over reconstructions (bottom row): a PNG under ``image_dir``,
        and to wandb when that is the logger (CSV has no image channel)."""
        n = min(n, images.shape[0])
        tiles = list(to_uint8(images[:n])) + list(to_uint8(recon[:n]))
        path = save_grid(tiles, self.image_dir / f"{name}.png", columns=n) \
            if self.image_dir is not None else None
        logger = self.logger
        if logger is not None and type(logger).__name__ == "WandbLogger":
            logger.log_image(key="reconstructions", images=[str(path)] if path else tiles,
                             step=self.global_step)
        return path

    # ---- checkpoints: the batch counter travels with them --------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batches_done"] = self.batches_done

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_done = int(checkpoint.get("batches_done", 0))


# --------------------------------------------------------------------------------------------
# The artifact: folder guard and card
# --------------------------------------------------------------------------------------------
def check_artifact_dir(path: Path, overwrite: bool) -> Path:
    """Fail before training, not after, when ``path`` already holds an artifact."""
    if (path / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a tokenizer; pass tokenizer.overwrite=true "
                              f"to replace it or tokenizer.artifact_dir=<another folder>")
    return path


def describe_data(cfg: DataConfig) -> str:
    if cfg.source == "shapes":
        return (f"ShapesWorld seed {cfg.seed}, {cfg.image_size}×{cfg.image_size}: train scenes "
                f"0..{cfg.num_train - 1}, held-out scenes {cfg.num_train}.."
                f"{cfg.num_train + cfg.num_val - 1}")
    return f"folder {cfg.root} ({cfg.image_size} px, {cfg.resize})"


def write_card(path: Path, tokenizer, cfg, command: str) -> str:
    """``card.md``: what the artifact is, what it was trained on, how well it does, and the
    command that made it. Returns the text."""
    import os
    import platform

    info, ae = tokenizer.info, tokenizer.autoencoder.config
    m = info.get("heldout", {})
    params = sum(p.numel() for p in tokenizer.autoencoder.parameters())
    size = (path / "model.safetensors").stat().st_size / 2 ** 20
    f, c = tokenizer.downsample_factor, tokenizer.latent_channels
    s = cfg.data.image_size
    trained = cfg.tokenizer.pretrained is None
    rows = [
        ("model", f"diffusers AutoencoderKL, block_out_channels {list(ae.block_out_channels)}, "
                  f"layers_per_block {ae.layers_per_block}, {params / 1e6:.2f} M parameters "
                  f"({size:.1f} MiB safetensors)"),
        ("latent", f"f{f}, {c} channels: {s}×{s} image -> {s // f}×{s // f}×{c}"),
        ("data", describe_data(cfg.data)),
        ("training", (f"{info.get('train_steps')} steps of batch {cfg.data.batch_size}, "
                      f"{info.get('train_seconds')} s wall" if trained else
                      f"none (pretrained: {cfg.tokenizer.pretrained})")),
        ("loss", (f"L1 {cfg.tokenizer.loss.l1_weight} + L2 {cfg.tokenizer.loss.l2_weight} + "
                  f"KL {cfg.tokenizer.loss.kl_weight}" +
                  (f" + GAN {cfg.tokenizer.loss.disc_weight}"
                   if cfg.tokenizer.loss.disc_weight else ""))),
        ("latent scaling", f"shift {float(tokenizer.shift):.5f}, scale "
                           f"{float(tokenizer.scale):.5f} ({info.get('scaling')})"),
        ("held-out PSNR", f"{m.get('psnr', float('nan')):.2f} dB over {m.get('images')} images"),
        ("held-out SSIM", f"{m.get('ssim', float('nan')):.4f}"),
        ("attribute accuracy", f"{m.get('attribute_accuracy', float('nan')):.2%} (ShapesWorld "
                               f"detector finds the same objects in the reconstruction)"),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, load average at the end "
                    f"{os.getloadavg()[0]:.1f} (other jobs share the CPU)"),
        ("command", f"`{command}`"),
    ]
    text = (f"# {cfg.tokenizer.name}\n\nContinuous image tokenizer (VAE) for fusion's "
            f"Transfusion family.\n\n| | |\n|---|---|\n" +
            "".join(f"| {k} | {v} |\n" for k, v in rows) +
            "\n```python\nfrom fusion.image.vae import VAETokenizer\n\n"
            f"tok = VAETokenizer.from_pretrained(\"{cfg.tokenizer.artifact_dir}\")\n"
            f"latents = tok.encode(images)   # (B, 3, {s}, {s}) in [-1, 1] -> "
            f"(B, {c}, {s // f}, {s // f})\nimages = tok.decode(latents)\n```\n")
    (path / "card.md").write_text(text)
    return text
