"""What ``scripts/evaluate.py`` runs, one function per sub-command (``cmd_<name>(args)`` on its
parsed arguments, returning the summary it prints): GenEval scoring, FID/KID, reconstruction,
editing and whole models. The scoring itself is fusion.eval; this module reads the options,
loads what they name and reports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fusion.data.prompts import read_prompts, shapes_prompt_set
from fusion.data.shapes import ShapesWorld
from fusion.distributed import is_first_process
from fusion.errors import UserError


def _detector(args):
    from fusion.eval.detectors import build_detector

    if args.detector == "mask2former":
        return build_detector("mask2former", config_path=args.detector_config,
                              checkpoint_path=args.detector_checkpoint,
                              clip_weights_path=args.clip_weights,
                              object_names_path=args.object_names, device=args.device)
    return build_detector(args.detector)


def cmd_geneval(args) -> dict:
    from fusion.eval.geneval import (
        format_summary,
        score_geneval_folder,
        shapes_ground_truth,
        write_geneval_folder,
    )

    if args.ground_truth or args.noise:
        world = ShapesWorld(seed=args.seed, size=args.size)
        prompts = read_prompts(args.prompts) if args.prompts else shapes_prompt_set(world)
        if args.ground_truth:
            images = shapes_ground_truth(prompts, world, args.per_prompt)
        else:
            rng = np.random.default_rng(args.seed)
            images = [list(rng.integers(0, 256, (args.per_prompt, args.size, args.size, 3),
                                        dtype=np.uint8)) for _ in prompts]
        write_geneval_folder(args.images, prompts, images, grid=args.grid,
                             overwrite=args.overwrite)
        print(f"wrote {sum(map(len, images))} images for {len(prompts)} prompts to "
              f"{args.images}")
    outfile = args.outfile or Path(args.images) / "results.jsonl"
    summary = score_geneval_folder(args.images, _detector(args), outfile)
    summary.pop("results")
    print(format_summary(summary))
    print(f"per-image results: {outfile}")
    return summary


def _image_set(spec: str, args, start: int):
    from fusion.eval.fid import ImageSet

    if spec == "shapes":
        return ImageSet.shapes(args.n, seed=args.seed, start=start, size=args.size)
    if spec == "noise":
        return ImageSet.noise(args.n, size=args.size, seed=args.seed + start)
    return ImageSet.folder(spec, size=args.size if args.resize else None, resize=args.resize,
                           limit=args.limit)


def cmd_fid(args) -> dict:
    from fusion.eval.fid import FIDScorer

    feature = json.loads(args.feature) if args.feature.startswith("{") else args.feature
    real = _image_set(args.real, args, args.real_start)
    fake = _image_set(args.fake, args, args.fake_start)
    scorer = FIDScorer(real, feature, weights_path=args.weights, kid=args.kid,
                       cache_dir=None if args.cache_dir == "none" else args.cache_dir,
                       device=args.device)
    result = scorer(fake)
    line = f"FID {result['fid']:.3f}"
    if "kid_mean" in result:
        line += f"   KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}"
    print(f"{line}   ({result['real']} vs {result['fake']}, {result['feature']}, real "
          f"statistics: cache {result['real_cache']})")
    return result


def cmd_reconstruction(args) -> dict:
    from fusion.eval.fid import REAL_SHAPES_START, FIDScorer, ImageSet
    from fusion.eval.reconstruction import reconstruct, reconstruction_metrics

    if args.vae:
        from fusion.image.vae import VAETokenizer

        vae = VAETokenizer.from_pretrained(args.vae).to(args.device)
        real = ImageSet.shapes(args.n, seed=args.seed, start=REAL_SHAPES_START, size=args.size)
        originals = real.read(0, len(real))
        recons = reconstruct(vae, originals)
        result = reconstruction_metrics(originals, recons, attributes=not args.no_attributes)
        fid = FIDScorer(real, "shapes", device=args.device)(ImageSet.arrays(recons, "recon"))
        result.update(rfid=fid["fid"], rkid=fid["kid_mean"])
    else:
        if not (args.originals and args.reconstructions):
            raise UserError("nothing to compare: give --vae <VAE artifact>, or both "
                            "--originals <folder> and --reconstructions <folder>")
        a, b = ImageSet.folder(args.originals), ImageSet.folder(args.reconstructions)
        if len(a) != len(b):
            raise UserError(f"{args.originals} holds {len(a)} images but {args.reconstructions} "
                            f"holds {len(b)}; pass folders of aligned originals and "
                            "reconstructions, one for one")
        result = reconstruction_metrics(a.read(0, len(a)), b.read(0, len(b)),
                                        attributes=not args.no_attributes)
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in result.items()))
    return result


def optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


# An option left at FROM_MODEL takes the value the model folder recorded from its training
# recipe (config.json "sampling", written by scripts/train.py), else SamplingConfig's default.
# A non-string default, so argparse never runs it through `type`.
FROM_MODEL = object()
SAMPLING_OPTIONS = {"steps": "diffusion_steps", "temperature": "temperature", "top_k": "top_k",
                    "guidance_scale": "guidance_scale",
                    "image_guidance_scale": "image_guidance_scale"}  # option -> SamplingConfig field


def parse_guidance_interval(given: list[str]) -> list[float]:
    """``--guidance-interval LO HI`` (or ``none``: guide at every step) as a checked interval."""
    from fusion.models.diffusion import check_guidance_interval

    if given == ["none"]:
        return [0.0, 1.0]  # every sampler step has 0 < t/T <= 1
    try:
        interval = [float(x) for x in given]
    except ValueError:
        raise UserError(f"--guidance-interval takes LO HI or 'none', got {given}") from None
    check_guidance_interval(interval)
    return interval


def _pipeline(args):
    """``--model`` loaded as fusion.FusionPipeline loads it (``--image-tokenizer``: a copy of
    the artifact to use instead of the folder's own), on ``--device``."""
    from fusion.api import FusionPipeline

    return FusionPipeline.from_pretrained(args.model, device=args.device,
                                          image_tokenizer=args.image_tokenizer)


def _resolve_sampling(args, meta: dict):
    """The settings to sample with (a SamplingConfig): the options given on the command line,
    the rest as the model folder recorded (fusion.families.folders.model_sampling, the rule of
    every entry point). Prints what it used."""
    from fusion.config import SamplingConfig
    from fusion.families.folders import model_sampling

    given = {key: getattr(args, name) for name, key in SAMPLING_OPTIONS.items()
             if getattr(args, name, FROM_MODEL) is not FROM_MODEL}
    interval = getattr(args, "guidance_interval", FROM_MODEL)
    settings = SamplingConfig(**given, seed=args.seed, guidance_interval=None
                              if interval is FROM_MODEL else parse_guidance_interval(interval))
    settings, _ = model_sampling(settings, meta, given)
    print("sampling: " + ", ".join(f"{k}={v}" for k, v in _used(args, settings).items()))
    return settings


def _used(args, settings) -> dict:
    """The settings of the options this sub-command has, for its report."""
    return {key: getattr(settings, key) for name, key in SAMPLING_OPTIONS.items()
            if hasattr(args, name)}


def cmd_editing(args) -> dict:
    from fusion.eval.editing import (
        EditEvalConfig,
        evaluate_editing,
        format_edit_summary,
        score_reference,
    )

    if args.local_targets and not args.tokenizer_ceiling:
        raise UserError("--local-targets only applies to --tokenizer-ceiling <VQ-GAN>; add "
                        "--tokenizer-ceiling or drop --local-targets")
    if args.diagnose and not args.model:
        raise UserError("--diagnose needs --model <Chameleon edit model folder>")
    if args.ground_truth or args.unedited or args.tokenizer_ceiling:
        which = ("target" if args.ground_truth else "source" if args.unedited
                 else "tokenizer")
        summary = score_reference(which, args.size, args.per_kind, args.start, args.world_seed,
                                  args.center_tol, image_tokenizer=args.tokenizer_ceiling,
                                  local_targets=args.local_targets)
    else:
        if not args.model:
            raise UserError("give --model <model folder>, or --ground-truth / --unedited / "
                             "--tokenizer-ceiling")
        pipe = _pipeline(args)
        sampler, tok, meta = pipe.sampler, pipe.tokenizer, pipe.meta
        settings = _resolve_sampling(args, meta)
        if args.diagnose:
            return _diagnose_editing(args, settings, sampler, tok, pipe.image_tokenizer,
                                     meta["image_size"])
        cfg = EditEvalConfig(per_kind=args.per_kind, sampling=settings,
                             batch_size=args.batch_size, heldout_start=args.start,
                             center_tol=args.center_tol)
        summary = evaluate_editing(sampler, tok, meta["image_size"], cfg,
                                   world_seed=args.world_seed, grid_path=args.grid)
        summary["model"] = str(args.model)
    print(format_edit_summary(summary))
    if not args.keep_results:
        summary.pop("results")
    return summary


def _diagnose_editing(args, settings, sampler, tok, image_tok, image_size: int) -> dict:
    """``editing --diagnose``: copy cells vs changed cells, per kind
    (fusion.eval.edit_diagnosis)."""
    from fusion.data.shapes import EDIT_KINDS, ShapesWorld
    from fusion.eval.edit_diagnosis import diagnose_chameleon_edits, format_diagnosis
    from fusion.eval.editing import shapes_edit_set
    from fusion.sampling.text import TokenSampling

    world = ShapesWorld(seed=args.world_seed, size=image_size)
    result = {"model": str(args.model), "heldout_start": args.start}
    for kind in EDIT_KINDS:
        edits = shapes_edit_set(world, args.per_kind, args.start, kinds=[kind])
        result[kind] = diagnose_chameleon_edits(
            sampler, tok, image_tok, edits, settings.guidance_scale,
            settings.image_guidance_scale, TokenSampling.from_config(settings), seed=settings.seed,
            batch_size=args.batch_size, center_tol=args.center_tol)
        print(f"-- {kind}\n{format_diagnosis(result[kind])}")
    return result


def cmd_text(args) -> dict:
    """The held-out text loss of a model folder (fusion.eval.text_loss)."""
    from fusion.eval.text_loss import heldout_text_loss

    pipe = _pipeline(args)
    result = {"model": str(args.model),
              **heldout_text_loss(pipe.model, pipe.tokenizer, args.documents,
                                  world_seed=args.world_seed)}
    _print_floats(result)
    return result


def cmd_interleaved(args) -> dict:
    """Interleaved generation from held-out story prompts, scored
    (fusion.eval.interleaved); ``--page``: the documents as a Markdown page."""
    from fusion.eval.interleaved import InterleavedEvalConfig, evaluate_interleaved
    from fusion.jobs.interleaved import write_interleaved

    pipe = _pipeline(args)
    settings = _resolve_sampling(args, pipe.meta)
    cfg = InterleavedEvalConfig(num_prompts=args.prompts, heldout_start=args.start,
                                max_new_tokens=args.max_new_tokens,
                                max_images=args.max_images, sampling=settings)
    summary, docs, stops = evaluate_interleaved(pipe.sampler, pipe.tokenizer,
                                                pipe.meta["image_size"], cfg,
                                                world_seed=args.world_seed)
    summary["model"] = str(args.model)
    if args.page and is_first_process():
        page, _ = write_interleaved(args.page, [d[0] for d in docs], docs, stops, summary)
        print(f"wrote {page}")
    _print_floats(summary)
    return summary


def cmd_model(args) -> dict:
    """What the main job's evaluation stage runs, for any saved model folder."""
    from fusion.eval.model import ModelEvalConfig, evaluate_model

    if args.world_seeds and args.world_seed:
        raise ValueError("give --world-seed or --world-seeds, not both")
    pipe = _pipeline(args)
    sampler, tok, meta = pipe.sampler, pipe.tokenizer, pipe.meta
    settings = _resolve_sampling(args, meta)
    sampling = _used(args, settings)
    # the interval guided in: given, else the one the model was trained with (diffusion only)
    interval = settings.guidance_interval or (
        ((meta.get("model") or {}).get("loss") or {}).get("diffusion") or {}).get(
        "guidance_interval")
    if interval is not None:
        sampling["guidance_interval"] = interval
        print(f"guidance_interval={interval}")
    world_seeds = args.world_seeds or [args.world_seed]
    per_set = {}
    for world_seed in world_seeds:
        # One prompt set varies by far more than its binomial error (docs/results.md), so
        # several sets are the way to compare models; each gets its own sampling seed.
        seed = args.seed + (world_seed if len(world_seeds) > 1 else 0)
        keep = getattr(args, "keep_images", None)
        if keep and len(world_seeds) > 1:
            keep = str(Path(keep) / f"world{world_seed}")
        cfg = ModelEvalConfig(images_per_tag=args.images_per_tag,
                              caption_images=args.caption_images,
                              sampling=dataclasses.replace(settings, seed=seed),
                              batch_size=args.batch_size, fid=not args.no_fid,
                              keep_images=keep)
        grid = args.grid if world_seed == world_seeds[0] else None
        per_set[world_seed] = evaluate_model(sampler, tok, meta["image_size"], cfg,
                                             world_seed=world_seed, grid_path=grid)
        if len(world_seeds) > 1:
            print(f"world seed {world_seed} (sampling seed {seed}):")
            _print_floats(per_set[world_seed], indent="  ")
    result = pool_prompt_sets(list(per_set.values()))
    if len(world_seeds) > 1:
        print(f"pooled over world seeds {world_seeds}:")
        result["per_world_seed"] = {w: _scores(r) for w, r in per_set.items()}
    _print_floats(result)
    return {"model": str(args.model), "sampling": sampling, **result}


def _print_floats(result: dict, indent: str = "") -> None:
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{indent}{key:40s} {value:.4f}")


def _scores(result: dict) -> dict:
    """The figures of one result: floats, and each GenEval tag's score."""
    return {k: v["score"] if isinstance(v, dict) else v for k, v in result.items()
            if isinstance(v, float) or (isinstance(v, dict) and "score" in v)}


def pool_prompt_sets(results: list[dict]) -> dict:
    """Combine evaluate_model results of several prompt sets: GenEval tags pool their
    images (correct / images), counts add up, every other figure is the mean; lists (caption
    examples) come from the first set. One set is returned unchanged."""
    if len(results) == 1:
        return results[0]
    pooled = {}
    for key, first in results[0].items():
        values = [r[key] for r in results]
        if isinstance(first, dict) and {"correct", "images"} <= first.keys():
            correct, images = sum(v["correct"] for v in values), sum(v["images"] for v in values)
            pooled[key] = {"score": correct / images if images else 0.0, "correct": correct,
                           "images": images}
        elif isinstance(first, float):
            pooled[key] = float(np.mean(values))
        elif isinstance(first, int) and not isinstance(first, bool):
            pooled[key] = sum(values)
        else:
            pooled[key] = first
    return pooled
