"""fusion against lucidrains' transfusion-pytorch, side by side: a training step and a
text->image sample at matched width, depth, heads, batch and documents.

    pip install -e ".[bench]"            # transfusion-pytorch (the peer)
    python scripts/bench.py peer         # transfusion_tiny's shape on ShapesWorld, CPU
    python scripts/bench.py peer --device cuda --backbone 350m --batch 64

Both models get the same documents (a ShapesWorld batch of the transfusion_tiny recipe: a
caption and one image of 16 latent patches each, caption first or image first) and the same
frozen VAE latents, patchified the same way (2 x 2 patches of the 4-channel latent: 16 tokens
of 16 values). The peer is built at the same width, depth and heads with its own defaults
otherwise (a 4x MLP, time conditioning in every layer, U-Net skips, QK RMSNorm), so its
parameter count differs and is printed. A training step is the loss, backward, clipping at 1.0
and AdamW on both sides (fusion.benchmarks.train_step.training_step); a sample draws one
image per prompt, guided (CFG 3), with ``--steps`` denoising steps (fusion: Euler; the peer:
its ODE solver's steps, midpoint by default) and returns latents on both sides (no decoder).
Cases run round-robin in one process and the median is reported, so drift of a shared machine
hits both alike (fusion.benchmarks.transformer.time_cases).
"""

from __future__ import annotations

import argparse
import random

import torch

from fusion.benchmarks.train_step import training_step
from fusion.benchmarks.transformer import time_cases

PEER = "transfusion_pytorch"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py peer", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", help="a backbone preset instead of the recipe's (e.g. 350m)")
    p.add_argument("--batch", type=int, help="documents per step (default: the recipe's)")
    p.add_argument("--sample-batch", type=int, default=8, help="prompts per sample call")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    p.add_argument("--rounds", type=int, default=8, help="timed calls per case")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def peer_documents(docs, encode, patch_size: int) -> list[list[torch.Tensor]]:
    """fusion Documents -> the peer's samples: text ids as a long tensor, each image as its
    latent patches on their grid (gh, gw, p·p·C), in document order."""
    from fusion.data.documents import Image, encode_images
    from fusion.models.patchify import latent_to_patches

    images = [seg for doc in docs for seg in doc.segments if isinstance(seg, Image)]
    latent = encode_images(encode, images, "cpu")  # (I, C, h, w)
    grid = (latent.shape[-2] // patch_size, latent.shape[-1] // patch_size)
    latents = iter(latent_to_patches(latent, patch_size).unflatten(1, grid))
    return [[next(latents) if isinstance(seg, Image) else torch.tensor(seg.ids)
             for seg in doc.segments] for doc in docs]


def main(argv: list[str] | None = None) -> None:
    try:
        from transfusion_pytorch import Transfusion as PeerTransfusion
    except ImportError:
        print("bench.py peer: skipped, transfusion-pytorch is not installed "
              "(pip install -e \".[bench]\")")
        return
    from omegaconf import open_dict

    from fusion.config import compose, resolve_path
    from fusion.data.datamodule import DocumentDataModule
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, family_sampler, load_image_tokenizer
    from fusion.models.transformer import count_parameters
    from fusion.training.encode_cache import EncodeCache
    from fusion.training.factory import resolve_precision

    args = parse_args(argv)
    device = torch.device(args.device)
    overrides = ["experiment=transfusion_tiny"]
    if args.backbone:
        overrides.append(f"model.arch.backbone={args.backbone}")
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    cfg = compose("train", overrides)
    tok = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    data = DocumentDataModule(cfg.data, tok)
    data.setup("fit")
    docs = next(iter(data.train_dataloader()))
    vae = load_image_tokenizer(cfg.image_tokenizer)
    encode = EncodeCache(vae.encode, 64 * 2**20)
    bf16 = str(resolve_precision(cfg.trainer.precision, device.type)).startswith("bf16")

    torch.manual_seed(args.seed)
    with open_dict(cfg.model):
        cfg.model.loss.caption_dropout = 0.0  # the peer's batch has no dropped captions either
    model, loss = build_family(cfg.model, tok, vae, cfg.data.image_size)
    model.to(device)
    bb, patch = model.transformer.cfg, cfg.model.arch.patch_size
    peer = PeerTransfusion(
        num_text_tokens=tok.vocab_size, dim_latent=vae.latent_channels * patch * patch,
        modality_default_shape=tuple(model.patchifier.grid),
        transformer=dict(dim=bb.d_model, depth=bb.n_layers, heads=bb.n_heads,
                         dim_head=bb.d_model // bb.n_heads)).to(device)
    samples = [[t.to(device) for t in doc] for doc in peer_documents(docs, encode, patch)]
    fusion_docs_encode = (lambda pixels: encode(pixels.cpu()).to(device))

    train = {
        "fusion": training_step(model, lambda i: loss(model, docs, fusion_docs_encode,
                                                      random.Random(i))["loss"],
                                cfg.optim.lr, bf16, device.type),
        "transfusion-pytorch": training_step(peer, lambda i: peer(samples), cfg.optim.lr,
                                             bf16, device.type),
    }
    step_s = time_cases(train, args.warmup, args.rounds, device)

    prompts = [tok.encode(cfg.sampling.prompts[i % len(cfg.sampling.prompts)])
               for i in range(args.sample_batch)]
    sampler = family_sampler(model.eval(), loss, tok, None)  # no decoder: latents
    som = peer.som_ids[0]
    peer_prompts = [torch.tensor([*p, som], device=device) for p in prompts]
    longest = max(map(len, peer_prompts)) + model.tokens_per_image  # one image, then stop
    peer.eval()

    def fusion_sample() -> None:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            sampler.generate_images(prompts, 3.0, args.steps, seed=args.seed)

    def peer_sample() -> None:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            peer.sample_many(peer_prompts, max_length=longest, modality_steps=args.steps,
                             fixed_modality_shape=tuple(model.patchifier.grid), cfg_scale=3.0)

    _quiet_peer_logs()
    sample_s = time_cases({"fusion": fusion_sample, "transfusion-pytorch": peer_sample},
                          1, max(1, args.rounds // 4), device)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"{where}, torch {torch.__version__}, {'bf16 autocast' if bf16 else 'float32'}; "
          f"width {bb.d_model}, depth {bb.n_layers}, heads {bb.n_heads}; training batch "
          f"{len(docs)} documents, sampling batch {args.sample_batch} at {args.steps} steps; "
          f"medians of round-robin calls\n")
    print("| model | parameters | ms / training step | documents/s | s / image | "
          "training speed vs the peer | sampling speed vs the peer |")
    print("|---|---|---|---|---|---|---|")
    params = {"fusion": count_parameters(model), "transfusion-pytorch": count_parameters(peer)}
    for name in train:
        print(f"| {name} | {params[name] / 1e6:.2f} M | {1000 * step_s[name]:.1f} | "
              f"{len(docs) / step_s[name]:,.0f} | {sample_s[name] / args.sample_batch:.4f} | "
              f"{step_s['transfusion-pytorch'] / step_s[name]:.2f}x | "
              f"{sample_s['transfusion-pytorch'] / sample_s[name]:.2f}x |")


def _quiet_peer_logs() -> None:
    """The peer logs one INFO line per sample through loguru; keep the table readable."""
    try:
        from loguru import logger

        logger.remove()
        logger.add(lambda _: None, level="WARNING")
    except ImportError:
        pass
