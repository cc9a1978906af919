"""Text->image sampling speed of either family: images/s, prompt KV-cached vs recomputed.

    python scripts/bench.py sampling --model outputs/demo/transfusion/model
    python scripts/bench.py sampling                        # a random tiny Transfusion model
    python scripts/bench.py sampling --family chameleon     # a random tiny Chameleon model

With the cache (the default sampler) the prompt runs once; Transfusion's denoising steps then
run only the N image positions against it (Transfusion, arXiv:2408.11039, sec. 3) and Chameleon
decodes its codes one position at a time. Without it every Transfusion step, and every Chameleon
code, re-runs the whole sequence. Both are timed on the same prompts, seed and settings,
round-robin, median of ``--repeats``; the report also gives the largest difference between the
two outputs (latents or codes), which must be ~0 (tests/test_transfusion.py and
tests/test_chameleon.py check the same equivalence). ``--steps`` is Transfusion's: a Chameleon
image is its h·w codes whatever the steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPTS = ["a photo of a red circle", "a photo of two blue squares",
           "a photo of a green star left of a yellow triangle",
           "a photo of a white diamond and a pink circle"]


def _random_tiny(family: str, tokenizer_path: str, image_tokenizer_path: str):
    """(model, loss, tokenizer, image tokenizer) of a family's tiny recipe, random weights."""
    from fusion.config import compose, resolve_path
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", [f"experiment={family}_tiny"])
    tok = TextTokenizer.from_file(resolve_path(tokenizer_path or cfg.data.text_tokenizer))
    vae = load_image_tokenizer(image_tokenizer_path or cfg.image_tokenizer)
    model, loss = build_family(cfg.model, tok, vae, cfg.data.image_size)
    return model, loss, tok, vae


def _synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py sampling", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a trained model folder (default: a random tiny one)")
    p.add_argument("--family", default="transfusion", choices=["transfusion", "chameleon"],
                   help="random model: which family's tiny recipe")
    p.add_argument("--tokenizer", help="random model: text tokenizer.json")
    p.add_argument("--vae", help="random model: image tokenizer folder (VAE or VQ-GAN)")
    p.add_argument("--batch", type=int, nargs="+", default=[8],
                   help="images per call (prompts cycled); several: one row each")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50],
                   help="denoising steps per image")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (timings synchronise CUDA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from fusion.families import family_sampler
    from fusion.families.folders import load_model

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model, loss, tok, vae, _ = load_model(args.model)
    else:
        model, loss, tok, vae = _random_tiny(args.family, args.tokenizer, args.vae)
    device = torch.device(args.device)
    model, vae = model.to(device), vae.to(device)
    diffuses = hasattr(model, "tokens_per_image")  # Transfusion; Chameleon decodes codes
    samplers = {"cached": family_sampler(model, loss, tok, vae, use_cache=True),
                "uncached": family_sampler(model, loss, tok, vae, use_cache=False)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{torch.get_num_threads()} threads")
    print(f"{type(model).__name__}, {where}, CFG {args.guidance_scale}, "
          f"median of {args.repeats}")
    print(f"{'batch':>5s} {'steps':>5s} {'cached s/img':>13s} {'images/s':>9s} "
          f"{'uncached s/img':>15s} {'speed-up':>9s} {'max |Δ|':>8s}")
    for batch in args.batch:
        prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        for steps in args.steps if diffuses else [None]:
            times = {name: [] for name in samplers}
            images = {}
            for _ in range(args.repeats):
                for name, sampler in samplers.items():  # round-robin: drift hits both alike
                    _synchronize(device)
                    start = time.perf_counter()
                    images[name] = sampler.generate_images(prompts, args.guidance_scale, steps,
                                                           seed=0)
                    _synchronize(device)
                    times[name].append((time.perf_counter() - start) / batch)
            cached, uncached = (statistics.median(times[n]) for n in ("cached", "uncached"))
            diff = float((images["cached"] - images["uncached"]).abs().max())
            print(f"{batch:5d} {steps or '-':>5} {cached:13.4f} {1 / cached:9.1f} "
                  f"{uncached:15.4f} {uncached / cached:8.2f}x {diff:8.1e}")
