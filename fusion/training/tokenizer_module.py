"""Stage 1: train an image autoencoder (VAE or VQ-GAN, by ``tokenizer.kind``) with Lightning.

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
import random
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusion.config import DataConfig
from fusion.data.images import save_grid, to_tensor, to_uint8
from fusion.image.losses import AutoencoderLoss, image_metrics
from fusion.image.schemas import AutoencoderLossConfig, TokenizerOptimConfig
from fusion.training.checkpointing import restore_rng_state, save_rng_state
from fusion.training.fusion_module import CosineClock  # one schedule for both stages

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Data: images only
# --------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """A record source (``source[i].image``: uint8 (H, W, 3)) -> float (3, H, W) in [-1, 1].

    ``crop``: a random ``crop``×``crop`` window at offsets that are multiples of ``align``
    (the autoencoder's factor, so a crop's latent grid lines up with the full image's). Read
    by a :class:`~fusion.data.datamodule.NumberedBatches` key ``(epoch, batch, index)``, the
    window is drawn from a generator seeded by ``seed`` and that key: it depends on where the
    image is in the run, not on which loader worker reads it, so a resumed run crops what the
    uninterrupted one would have. Read by a plain index, it draws from torch's global RNG.
    """

    def __init__(self, source, crop: int | None = None, align: int = 1, seed: int = 0):
        self.source, self.crop, self.align, self.seed = source, crop, align, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple) -> torch.Tensor:
        keyed = isinstance(key, tuple)
        image = to_tensor(self.source[key[-1] if keyed else key].image)
        if not self.crop:
            return image
        h, w = image.shape[-2:]
        if self.crop > min(h, w) or self.crop % self.align:
            raise ValueError(f"train_crop={self.crop} must be <= the image size {h}x{w} and a "
                             f"multiple of the downsampling factor {self.align}")
        if keyed:
            rng = random.Random("/".join(map(str, ("crop", self.seed, *key))))
            y, x = (rng.randrange((n - self.crop) // self.align + 1) for n in (h, w))
        else:
            y, x = (int(torch.randint(0, (n - self.crop) // self.align + 1, ())) for n in (h, w))
        y, x = y * self.align, x * self.align
        return image[:, y:y + self.crop, x:x + self.crop]


class ImageDataModule(L.LightningDataModule):
    """The images of ``build_caption_sources(cfg)`` (captions unused): batches (B, 3, H, W).

    The data are split over data-parallel ranks here, as in
    :class:`~fusion.data.datamodule.DocumentDataModule` (the Trainer runs with
    ``splits_data_itself``): training draws from a
    :class:`~fusion.data.datamodule.ResumableSampler`, so a checkpoint's data position
    (fusion.training.callbacks.DataPosition) resumes on the batches that come next, and
    validation gives each rank its own slice of the held-out images."""

    def __init__(self, cfg: DataConfig, train_crop: int | None = None, crop_align: int = 1):
        super().__init__()
        self.cfg = cfg
        self.train_crop, self.crop_align = train_crop, crop_align  # training batches only
        self.train_source = self.val_source = None
        self.train_sampler = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches) not yet applied

    def setup(self, stage: str | None = None) -> None:
        from fusion.data.datamodule import build_caption_sources

        if self.train_source is None:
            self.train_source, self.val_source = build_caption_sources(self.cfg)

    def resume_at(self, epoch: int, batches: int, streams: list | None = None) -> None:
        """Start training after ``batches`` batches of ``epoch`` (DataPosition's record)."""
        self._resume = (epoch, batches)

    def _loader(self, dataset: Dataset, **batching) -> DataLoader:
        # Its own generator: worker seeds are not drawn from the global RNG, which the
        # checkpoints carry (fusion.training.checkpointing.save_rng_state).
        return DataLoader(dataset, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.cfg.seed), **batching)

    def train_dataloader(self) -> DataLoader:
        from fusion.data.datamodule import (
            NumberedBatches,
            per_rank_batch,
            positioned_sampler,
            trainer_ranks,
        )

        world, rank = trainer_ranks(self)
        self.train_sampler = positioned_sampler(self.train_sampler, len(self.train_source),
                                                self.cfg, world, rank, self._resume)
        self._resume = None
        dataset = ImageDataset(self.train_source, self.train_crop, self.crop_align,
                               self.cfg.seed)
        share = per_rank_batch(self.cfg.batch_size, world)  # data.batch_size is the global one
        return self._loader(dataset, batch_sampler=NumberedBatches(self.train_sampler, share,
                                                                   drop_last=True))

    def val_dataloader(self) -> DataLoader:
        from fusion.data.datamodule import RankSlice, per_rank_batch, trainer_ranks

        world, rank = trainer_ranks(self)
        return self._loader(ImageDataset(self.val_source),  # full images
                            batch_size=per_rank_batch(self.cfg.batch_size, world),
                            sampler=RankSlice(len(self.val_source), world, rank))

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
class AutoencoderModule(L.LightningModule):
    """Trains ``autoencoder`` (stage-1 interface above) against :class:`AutoencoderLoss`."""

    def __init__(self, autoencoder: nn.Module, loss: AutoencoderLossConfig,
                 optim: TokenizerOptimConfig, image_log_every: int = 500,
                 image_dir: str | Path | None = None, metrics_every: int = 10):
        super().__init__()
        self.automatic_optimization = False  # G and D alternate (taming's two optimisers)
        self.autoencoder = autoencoder
        self.loss = AutoencoderLoss(loss)
        self.optim_cfg = optim
        self.image_log_every = image_log_every
        self.image_dir = Path(image_dir) if image_dir else None
        self.metrics_every = max(1, metrics_every)
        self.batches_done = 0  # batches, not optimiser steps (see module docstring)
        self.clock = CosineClock(optim.warmup_steps, optim.min_lr_ratio, optim.time_budget_s)

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
            opt = torch.optim.AdamW(params, lr=lr, betas=(c.beta1, c.beta2),
                                    weight_decay=c.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: self.clock.multiplier(s, total))
            return opt, {"scheduler": sched, "interval": "step"}

        opt_g, sched_g = make(self.autoencoder.parameters(), c.lr)
        if self.loss.discriminator is None:
            return [opt_g], [sched_g]
        opt_d, sched_d = make(self.loss.discriminator.parameters(),
                              c.lr * self.loss.cfg.disc_lr_scale)
        return [opt_g, opt_d], [sched_g, sched_d]

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
        self.clock.start()
        if self.loss.perceptual is not None:
            self.loss.perceptual.eval()  # a frozen feature net: no dropout

    def training_step(self, images: torch.Tensor, batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        step = self.batches_done
        self.clock.agree(self.trainer.strategy.broadcast)  # one reading for every rank

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
        if self.clock.expired():
            self.trainer.should_stop = True  # the cosine has reached its end

        if step % self.metrics_every == 0:  # SSIM is not free; every few batches is plenty
            logs.update(image_metrics(recon, images))
            if hasattr(self.autoencoder, "pop_code_stats"):  # a VQ-GAN: codebook usage and
                logs.update(self.autoencoder.pop_code_stats())  # perplexity since last time
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True,
                      prog_bar=False, batch_size=images.shape[0])
        self.log("loss", logs["loss"], prog_bar=True, logger=False)
        if "psnr" in logs:
            self.log("psnr", logs["psnr"], prog_bar=True, logger=False)
        if "codebook_usage" in logs:
            self.log("usage", logs["codebook_usage"], prog_bar=True, logger=False)
        if self.image_log_every and step % self.image_log_every == 0 and self.global_rank == 0:
            self.log_images(images, recon, f"step{step:07d}")

    def validation_step(self, images: torch.Tensor, batch_idx: int) -> None:
        recon, aux = self.autoencoder(images)  # eval mode: the posterior mean
        _, logs = self.loss.generator_loss(images, recon, aux, self.batches_done)
        logs.update(image_metrics(recon, images))
        self.log_dict({f"val/{k}": v for k, v in logs.items() if k in
                       ("loss", "rec", "l1", "l2", "kl", "psnr", "ssim")},
                      batch_size=images.shape[0], sync_dist=True)

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

    # ---- checkpoints: what a resumed run needs to go on as the uninterrupted one ----------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["batches_done"] = self.batches_done
        checkpoint["cosine_clock"] = self.clock.state_dict()
        save_rng_state(checkpoint)  # the posterior samples and the crops' global draws

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_done = int(checkpoint.get("batches_done", 0))
        self.clock.load_state_dict(checkpoint.get("cosine_clock", {}))
        restore_rng_state(checkpoint, self.trainer.world_size, self.trainer.global_rank)


# --------------------------------------------------------------------------------------------
# The artifact: folder guard and card
# --------------------------------------------------------------------------------------------
def check_artifact_dir(path: Path, overwrite: bool) -> Path:
    """Fail before training, not after, when ``path`` already holds an artifact."""
    if (path / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a tokenizer; pass tokenizer.overwrite=true "
                              f"to replace it or tokenizer.artifact_dir=<another folder>")
    return path


TOKENIZER_KINDS = ("vae", "vqgan")


def build_image_tokenizer(cfg) -> nn.Module:
    """A tokenizer config -> a fresh (or pretrained) stage-1 network, by ``cfg.kind``."""
    if cfg.kind == "vae":
        from fusion.image.vae import build_vae_tokenizer

        return build_vae_tokenizer(cfg)
    if cfg.kind == "vqgan":
        from fusion.image.vqgan import build_vqgan_tokenizer

        return build_vqgan_tokenizer(cfg)
    raise ValueError(f"unknown tokenizer.kind {cfg.kind!r}; expected one of {TOKENIZER_KINDS}")


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

    info = tokenizer.info
    m = info.get("heldout", {})
    size = (path / "model.safetensors").stat().st_size / 2 ** 20
    pretrained = cfg.tokenizer.get("pretrained")
    about, model_rows, aux_loss, extra_rows, usage = _card_parts(tokenizer, cfg, size)
    gan = (f" + GAN {cfg.tokenizer.loss.disc_weight} from batch {cfg.tokenizer.loss.disc_start}"
           if cfg.tokenizer.loss.disc_weight else "")
    rows = [
        *model_rows,
        ("data", describe_data(cfg.data)),
        ("training", (f"{info.get('train_steps')} steps of batch {cfg.data.batch_size}, "
                      f"{info.get('train_seconds')} s wall, {info.get('train_cpu_seconds')} s "
                      f"CPU (all threads), precision {cfg.trainer.precision}"
                      if pretrained is None else
                      f"none (pretrained: {pretrained})")),
        ("loss", f"L1 {cfg.tokenizer.loss.l1_weight} + L2 {cfg.tokenizer.loss.l2_weight}"
                 f"{aux_loss}{gan}"),
        ("held-out PSNR", f"{m.get('psnr', float('nan')):.2f} dB over {m.get('images')} images"),
        ("held-out SSIM", f"{m.get('ssim', float('nan')):.4f}"),
        ("attribute accuracy", f"{m.get('attribute_accuracy', float('nan')):.2%} (ShapesWorld "
                               f"detector finds the same objects in the reconstruction)"),
        *extra_rows,
        ("machine", f"trained on {info.get('train_device', 'cpu')}; "
                    f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
                    f"torch thread(s), load average at the end {os.getloadavg()[0]:.1f} "
                    f"(other jobs share the CPU)"),
        ("command", f"`{command}`"),
    ]
    text = (f"# {cfg.tokenizer.name}\n\n{about}\n\n| | |\n|---|---|\n" +
            "".join(f"| {k} | {v} |\n" for k, v in rows) + f"\n```python\n{usage}```\n")
    (path / "card.md").write_text(text)
    return text


def _card_parts(tokenizer, cfg, size_mib: float):
    """What differs between a VAE's and a VQ-GAN's card: (one-line description, model rows,
    the aux loss terms, rows after the shared metrics, usage snippet)."""
    params = sum(p.numel() for p in tokenizer.parameters())
    f, s, art = tokenizer.downsample_factor, cfg.data.image_size, cfg.tokenizer.artifact_dir
    if cfg.tokenizer.kind == "vqgan":
        ae, q, m = tokenizer.autoencoder_config, tokenizer.quantizer_config, \
            tokenizer.info.get("heldout", {})
        k, h = tokenizer.codebook_size, s // f
        args = ", ".join(f"{a} {v}" for a, v in q.items() if a != "kind")
        model = [("model", f"VQ-GAN: diffusers Encoder/Decoder, block_out_channels "
                           f"{list(ae['block_out_channels'])}, layers_per_block "
                           f"{ae['layers_per_block']}, {params / 1e6:.2f} M parameters "
                           f"({size_mib:.1f} MiB safetensors)"),
                 ("quantizer", f"{q['kind']} (vector-quantize-pytorch; {args}): {k} codes"),
                 ("codes", f"f{f}: {s}×{s} image -> {h}×{h} = {h * h} codes in [0, {k})")]
        aux = " + quantizer loss (weights above)" if q["kind"] != "fsq" else ""
        extra = [("codebook usage", f"{m.get('codebook_usage', float('nan')):.2%} of {k} "
                                    f"codes used on the held-out images"),
                 ("codebook perplexity", f"{m.get('codebook_perplexity', float('nan')):.1f}")]
        usage = ("from fusion.image.vqgan import VQTokenizer\n\n"
                 f"tok = VQTokenizer.from_pretrained(\"{art}\")\n"
                 f"codes = tok.encode(images)   # (B, 3, {s}, {s}) in [-1, 1] -> "
                 f"(B, {h}, {h}) int64\nimages = tok.decode(codes)\n")
        return ("Discrete image tokenizer (VQ-GAN) for fusion's Chameleon family.", model,
                aux, extra, usage)
    ae, c = tokenizer.autoencoder.config, tokenizer.latent_channels
    model = [("model", f"diffusers AutoencoderKL, block_out_channels "
                       f"{list(ae.block_out_channels)}, layers_per_block {ae.layers_per_block}, "
                       f"{params / 1e6:.2f} M parameters ({size_mib:.1f} MiB safetensors)"),
             ("latent", f"f{f}, {c} channels: {s}×{s} image -> {s // f}×{s // f}×{c}")]
    extra = [("latent scaling", f"shift {float(tokenizer.shift):.5f}, scale "
                                f"{float(tokenizer.scale):.5f} ({tokenizer.info.get('scaling')})")]
    usage = ("from fusion.image.vae import VAETokenizer\n\n"
             f"tok = VAETokenizer.from_pretrained(\"{art}\")\n"
             f"latents = tok.encode(images)   # (B, 3, {s}, {s}) in [-1, 1] -> "
             f"(B, {c}, {s // f}, {s // f})\nimages = tok.decode(latents)\n")
    return ("Continuous image tokenizer (VAE) for fusion's Transfusion family.", model,
            f" + KL {cfg.tokenizer.loss.kl_weight}", extra, usage)
