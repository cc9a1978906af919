"""Stage-1 losses and reconstruction metrics, shared by the VAE and the VQ-GAN.

The loss follows taming-transformers' ``VQLPIPSWithDiscriminator`` / LDM's
``LPIPSWithDiscriminator`` (Esser et al. 2021, arXiv:2012.09841; Rombach et al. 2022,
arXiv:2112.10752), pared down to what fusion uses:

    L_G = l1·|x - x̂| + l2·(x - x̂)² + p·LPIPS(x, x̂) + Σ_k w_k·aux_k + d·λ·g(x̂)·[step ≥ start]
    L_D = ½·(mean relu(1 - D(x)) + mean relu(1 + D(x̂)))                       (hinge)

``aux`` is what the autoencoder's ``forward`` returns besides the reconstruction: ``{"kl"}``
for the VAE (weight ``kl_weight``), the quantizer's codebook/commitment loss for a VQ-GAN
(weight 1: vector-quantize-pytorch already weights its own terms). λ is taming's adaptive
weight ``||∇_last L_rec|| / (||∇_last g|| + 1e-4)`` at the decoder's last layer, which keeps
the GAN gradient on the scale of the reconstruction gradient.

Shapes: images (B, 3, H, W) in [-1, 1]; discriminator logits (B, 1, H', W') (one per patch).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from fusion.image.schemas import AutoencoderLossConfig


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0,
                        l2_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-pixel means: ``{"l1", "l2", "rec"}`` with ``rec = l1_weight·l1 + l2_weight·l2``.

    L2 is what PSNR measures; L1 keeps gradients alive on small errors (sharper edges) --
    LDM's autoencoders train on L1 (+LPIPS), we add L2 for the PSNR target.
    """
    l1 = (recon - target).abs().mean()
    l2 = (recon - target).square().mean()
    return {"l1": l1, "l2": l2, "rec": l1_weight * l1 + l2_weight * l2}


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, arXiv:1611.07004), as in taming's
    ``NLayerDiscriminator``: 4×4 convs, stride 2 for the first ``n_layers``, then two
    stride-1 convs; each output logit judges one ~70×70 (n_layers=3) receptive field.

    images (B, 3, H, W) -> logits (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2)
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1),
                                   nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _dcgan_init(m: nn.Module) -> None:
    # taming's weights_init: N(0, 0.02) convs, N(1, 0.02) norm scales (DCGAN, arXiv:1511.06434)
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017; taming's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: raise D's score of reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight``: ||∇rec|| / (||∇g|| + 1e-4), clamped to
    [0, max_weight], detached. Gradients are taken at ``last_layer`` (the decoder's output
    conv). When g does not reach that layer (or its gradient is zero), ∇g counts as zero and
    the weight is the finite ``min(||∇rec|| / 1e-4, max_weight)``.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True,
                                   allow_unused=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    rec_norm = rec_grad.norm() if rec_grad is not None else last_layer.new_zeros(())
    g_norm = g_grad.norm() if g_grad is not None else last_layer.new_zeros(())
    weight = rec_norm / (g_norm + 1e-4)
    return torch.nan_to_num(weight, nan=0.0, posinf=max_weight).clamp(0.0, max_weight).detach()


def build_perceptual(weights_path: str | Path) -> nn.Module:
    """LPIPS-VGG (Zhang et al. 2018, arXiv:1801.03924) from LOCAL weights only.

    Needs the optional ``lpips`` package (it pulls torchvision, which fusion keeps out of its
    core dependencies: docs/design.md, Principles) and one safetensors file holding the whole
    LPIPS state dict (VGG trunk + linear heads). The network is built with random weights
    (nothing is downloaded) and then filled from that file. Not exercised by the CPU test suite.
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LPIPS weights file not found (perceptual loss needs "
                                f"a local safetensors file; nothing is downloaded)")
    try:
        import lpips  # optional extra
    except ImportError as err:
        raise ImportError("loss.perceptual_weight > 0 needs the optional `lpips` package "
                          "(and torchvision); or set loss.perceptual_weight=0") from err
    from safetensors.torch import load_file

    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# The combined loss
# --------------------------------------------------------------------------------------------
class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of a stage-1 autoencoder (VAE or VQ-GAN).

    Holds the discriminator (when ``disc_weight > 0``) and the perceptual net (when
    ``perceptual_weight > 0``) so the training module can hand their parameters to their own
    optimizer. No optimisation happens here.
    """

    def __init__(self, cfg: AutoencoderLossConfig):
        super().__init__()
        self.cfg = cfg
        self.discriminator = (NLayerDiscriminator(channels=cfg.disc_channels,
                                                  n_layers=cfg.disc_layers)
                              if cfg.disc_weight > 0 else None)
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            if not cfg.perceptual_weights_path:
                raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_weights_path "
                                 "(a local LPIPS safetensors file)")
            self.perceptual = build_perceptual(cfg.perceptual_weights_path)

    def aux_weight(self, name: str) -> float:
        return self.cfg.kl_weight if name == "kl" else 1.0

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.disc_start

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor,
                       aux: dict[str, torch.Tensor], step: int,
                       last_layer: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total autoencoder loss and its parts (detached, for logging)."""
        c = self.cfg
        logs = reconstruction_loss(recon, images, c.l1_weight, c.l2_weight)
        rec = logs["rec"]
        if self.perceptual is not None:
            logs["perceptual"] = self.perceptual(recon, images).mean()
            rec = rec + c.perceptual_weight * logs["perceptual"]
        total = rec + sum(self.aux_weight(k) * v for k, v in aux.items())
        logs.update(aux)
        if self.gan_active(step):
            if last_layer is None:
                raise ValueError("the GAN loss needs last_layer (the decoder's output weight)")
            # Only the generator's gradient is wanted: D stays fixed in this pass.
            self.discriminator.requires_grad_(False)
            g = generator_adversarial_loss(self.discriminator(recon))
            self.discriminator.requires_grad_(True)
            lam = (adaptive_weight(rec, g, last_layer, c.adaptive_weight_max)
                   if self.training else torch.zeros(()))
            total = total + c.disc_weight * lam * g
            logs.update(g_loss=g, adaptive_weight=lam)
        logs["loss"] = total
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = self.discriminator(images.detach())
        fake = self.discriminator(recon.detach())
        loss = hinge_d_loss(real, fake)
        return loss, {"d_loss": loss.detach(), "logits_real": real.detach().mean(),
                      "logits_fake": fake.detach().mean()}


# --------------------------------------------------------------------------------------------
# Training-time metrics (held-out figures: fusion.eval.reconstruction.evaluate_reconstruction)
# --------------------------------------------------------------------------------------------
def psnr(images: torch.Tensor, targets: torch.Tensor, data_range: float) -> torch.Tensor:
    """Per-image PSNR (dB) of (N, C, H, W) batches, via torchmetrics: (N,). Identical images
    (+inf) are capped at 100 dB so that means stay finite. The one PSNR of fusion: training
    metrics, held-out reconstruction figures and edit scores all use it."""
    p = peak_signal_noise_ratio(images, targets, data_range=data_range, reduction="none",
                                dim=(1, 2, 3))
    return p.clamp(max=100.0)


def image_metrics(recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean PSNR (dB) and SSIM of images in [-1, 1] (data range 2), via torchmetrics.

    PSNR is per image, then averaged (the usual reporting in VQGAN/VAE papers).
    """
    recon = recon.detach().float().clamp(-1, 1)
    target = target.detach().float()
    mean_psnr = psnr(recon, target, data_range=2.0).mean()
    ssim = structural_similarity_index_measure(recon, target, data_range=2.0)
    return {"psnr": mean_psnr, "ssim": ssim}
