"""Reconstruction metrics for image tokenizers (VAE / VQ-GAN): pixels and content.

* PSNR and SSIM (Wang et al. 2004) per image through torchmetrics' functional API, averaged
  over images (not the PSNR of the pooled error, which a few bad images would hide in);
* attribute accuracy: the share of reconstructions in which the ShapesWorld detector finds the
  same multiset of (class, colour) as in the original -- or as in the true scene when scenes
  are given (:func:`fusion.data.shapes.same_objects`). A tokenizer can score a fine PSNR while
  turning a diamond into a blob; this catches it.

Inputs are uint8 (N, H, W, 3) arrays (or lists of (H, W, 3)), the pair aligned by index.
:func:`reconstruct` makes the reconstructions with any tokenizer that has ``encode`` and
``decode`` on float (B, 3, H, W) in [-1, 1] (the VAE's latents, a VQ-GAN's codes); a
reconstruction FID is then ``fusion.eval.fid.compute_fid(originals, reconstructions)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import (
    structural_similarity_index_measure,
)
from tqdm.auto import tqdm

from fusion.data.images import to_uint8
from fusion.data.shapes import Scene, detect, same_objects
from fusion.image.losses import psnr as image_psnr


def _stack(images: np.ndarray | Sequence[np.ndarray], name: str) -> np.ndarray:
    try:
        arr = images if isinstance(images, np.ndarray) else np.stack(list(images))
    except ValueError as err:
        raise ValueError(f"{name}: images differ in shape ({err})") from err
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 (N, H, W, 3) images, got {arr.dtype} "
                         f"{arr.shape}")
    return arr


@torch.no_grad()
def unit_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float64 (N, 3, H, W) in [0, 1], as the metrics take them."""
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() / 255


def reconstruct(tokenizer: torch.nn.Module, images: np.ndarray | Sequence[np.ndarray],
                batch_size: int = 64, progress: bool = True,
                sources: np.ndarray | Sequence[np.ndarray] | None = None) -> np.ndarray:
    """``decode(encode(x))`` of uint8 (N, H, W, 3) images, as uint8 (N, H, W, 3), in eval
    mode on the tokenizer's device.

    ``sources`` (a VQ-GAN only): the images are edits of these, and are decoded from the
    codes a Chameleon model trained with ``edit_target_codes=local`` learns, the source's
    codes away from the change (:func:`fusion.models.chameleon.local_edit_codes`)."""
    arr = _stack(images, "images")
    src = None if sources is None else _stack(sources, "sources")
    if src is not None and src.shape != arr.shape:
        raise ValueError(f"sources {src.shape} and images {arr.shape} differ in shape")
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device

    def pixels(a: np.ndarray, start: int) -> torch.Tensor:  # fusion's [-1, 1] pixels
        x = torch.from_numpy(a[start:start + batch_size]).permute(0, 3, 1, 2)
        return x.float().div(127.5).sub(1.0).to(device)
    out = []
    try:
        for start in tqdm(range(0, len(arr), batch_size), desc="reconstruct",
                          disable=not progress, leave=False):
            x = pixels(arr, start)
            codes = tokenizer.encode(x)
            if src is not None:
                from fusion.models.chameleon import local_edit_codes

                s = pixels(src, start)
                codes = local_edit_codes(tokenizer.encode(s), codes, s, x)
            out.append(to_uint8(tokenizer.decode(codes)))
    finally:
        tokenizer.train(was_training)
    return np.concatenate(out)


def reconstruction_metrics(originals: np.ndarray | Sequence[np.ndarray],
                           reconstructions: np.ndarray | Sequence[np.ndarray],
                           scenes: Sequence[Scene] | None = None, attributes: bool = True,
                           batch_size: int = 256, progress: bool = True) -> dict[str, float]:
    """PSNR (dB), SSIM and detector attribute accuracy of reconstructions.

    Args:
        originals, reconstructions: aligned uint8 (N, H, W, 3) images.
        scenes: the originals' true ShapesWorld scenes; when given, reconstructions are
            checked against them instead of against detections on the originals.
        attributes: run the detector (ShapesWorld images only; ~300 images/s).
    """
    a, b = _stack(originals, "originals"), _stack(reconstructions, "reconstructions")
    if a.shape != b.shape:
        raise ValueError(f"originals {a.shape} and reconstructions {b.shape} differ in shape")
    if len(a) == 0:
        raise ValueError("no images")
    if scenes is not None and len(scenes) != len(a):
        raise ValueError(f"got {len(scenes)} scenes for {len(a)} images")
    psnr, ssim, same = [], [], []
    for start in tqdm(range(0, len(a), batch_size), desc="reconstruction", disable=not progress,
                      leave=False):
        x, y = unit_images(a[start:start + batch_size]), unit_images(b[start:start + batch_size])
        psnr.append(image_psnr(y, x, data_range=1.0))
        ssim.append(structural_similarity_index_measure(y, x, data_range=1.0,
                                                        reduction="none"))
        if attributes:
            for i in range(start, min(start + batch_size, len(a))):
                truth = scenes[i] if scenes is not None else detect(a[i])
                same.append(same_objects(truth, detect(b[i])))
    out = {"images": len(a), "psnr": float(torch.cat(psnr).mean()),
           "ssim": float(torch.cat(ssim).mean())}
    if attributes:
        out["attribute_accuracy"] = float(np.mean(same))
    return out


@torch.no_grad()
def evaluate_reconstruction(tokenizer: torch.nn.Module, source: Sequence, n: int | None = None,
                            batch_size: int = 64, progress: bool = False) -> dict:
    """PSNR, SSIM and attribute accuracy of ``decode(encode(x))`` on ``source[:n]``.

    Works for any image tokenizer with ``encode``/``decode`` on (B, 3, H, W) in [-1, 1]
    (the VAE's latents, a VQ-GAN's codes). ``source[i].image`` is uint8 (H, W, 3) (a fusion
    record source; for ShapesWorld's held-out scenes, ``build_caption_sources(cfg)[1]``).
    Reconstructions are judged as the uint8 images a user sees, by
    :func:`reconstruction_metrics`; attribute accuracy compares
    detections on the original and the reconstruction (``same_objects``).
    Returns ``{"images", "psnr", "ssim", "attribute_accuracy"}``.
    """
    from fusion.data.images import source_batches, to_tensor
    from fusion.image.artifacts import eval_mode

    device = next(tokenizer.parameters()).device
    originals, recons = [], []
    with eval_mode(tokenizer):
        for batch in source_batches(source, n, batch_size, "evaluate_reconstruction"):
            x = torch.stack([to_tensor(img) for img in batch]).to(device)
            originals.append(batch)
            recons.append(to_uint8(tokenizer.decode(tokenizer.encode(x))))
    return reconstruction_metrics(np.concatenate(originals), np.concatenate(recons),
                                  progress=progress)
