"""Evaluate images and models: GenEval scoring, FID/KID, reconstruction, editing, models.

    # GenEval on a folder in GenEval's layout (<dir>/<NNNNN>/metadata.jsonl + samples/<NNNN>.png)
    python scripts/evaluate.py geneval --images outputs/samples --detector shapes
    # ... on ground-truth renders / uniform noise of the ShapesWorld prompt set (sanity checks)
    python scripts/evaluate.py geneval --ground-truth --images outputs/geneval-gt
    python scripts/evaluate.py geneval --noise --images outputs/geneval-noise
    # FID/KID between two sets: a folder, `shapes` (held-out ShapesWorld) or `noise`
    python scripts/evaluate.py fid --real shapes --fake outputs/samples
    python scripts/evaluate.py fid --real shapes --fake shapes --fake-start 52000
    # PSNR / SSIM / attribute accuracy between aligned folders of originals and reconstructions
    python scripts/evaluate.py reconstruction --originals a/ --reconstructions b/
    # ... of a VAE on held-out ShapesWorld scenes, plus reconstruction FID/KID
    python scripts/evaluate.py reconstruction --vae tokenizers/<vae>
    # edit accuracy per kind + PSNR of a fine-tuned editing model on held-out ShapesWorld edits
    python scripts/evaluate.py editing --model outputs/train/edit_transfusion_tiny/model
    python scripts/evaluate.py editing --ground-truth   # the scorer on true targets: 1.0
    python scripts/evaluate.py editing --tokenizer-ceiling tokenizers/shapes-vae
    # a trained family model: GenEval-shapes, FID-shapes and captioning on held-out scenes
    python scripts/evaluate.py model --model outputs/train/transfusion_tiny/model
    python scripts/evaluate.py model --model ... --no-fid --world-seeds 0 1 2  # 3 prompt sets

A plain argparse CLI rather than a Hydra entry point: it composes no model, trainer or data
config; it reads folders and writes a results file, and Hydra's run-directory handling would
only get in the way of relative paths. Training-time evaluation calls fusion.eval directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fusion.data.prompts import read_prompts, shapes_prompt_set
from fusion.data.shapes import ShapesWorld
from fusion.errors import UserError, report_user_errors


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


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


# An option left at FROM_MODEL takes the value the model folder recorded from its training
# recipe (config.json "sampling", written by scripts/train.py), else SamplingConfig's default.
# A non-string default, so argparse never runs it through `type`.
FROM_MODEL = object()
SAMPLING_OPTIONS = {"steps": "diffusion_steps", "temperature": "temperature", "top_k": "top_k",
                    "guidance_scale": "guidance_scale",
                    "image_guidance_scale": "image_guidance_scale"}  # option -> SamplingConfig field


def _resolve_sampling(args, meta: dict) -> dict:
    """Fill the sampling options not given on the command line; returns what was used."""
    from fusion.families.folders import recorded_sampling

    defaults = recorded_sampling(meta)
    used = {}
    for name, key in SAMPLING_OPTIONS.items():
        if getattr(args, name, None) is FROM_MODEL:
            setattr(args, name, defaults[key])
        if hasattr(args, name):
            used[key] = getattr(args, name)
    print("sampling: " + ", ".join(f"{k}={v}" for k, v in used.items()))
    return used


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
        from fusion.families.folders import load_model

        model, loss, tok, image_tok, meta = load_model(args.model, image_tokenizer=args.image_tokenizer)
        model.to(args.device), image_tok.to(args.device)
        _resolve_sampling(args, meta)
        if args.diagnose:
            return _diagnose_editing(args, _sampler(args, model, loss, tok, image_tok), tok,
                                     image_tok, meta["image_size"])
        cfg = EditEvalConfig(per_kind=args.per_kind, guidance_scale=args.guidance_scale,
                             image_guidance_scale=args.image_guidance_scale,
                             diffusion_steps=args.steps, temperature=args.temperature,
                             top_k=args.top_k, batch_size=args.batch_size, seed=args.seed,
                             heldout_start=args.start, center_tol=args.center_tol)
        summary = evaluate_editing(_sampler(args, model, loss, tok, image_tok), tok,
                                   meta["image_size"], cfg, world_seed=args.world_seed,
                                   grid_path=args.grid)
        summary["model"] = str(args.model)
    print(format_edit_summary(summary))
    if not args.keep_results:
        summary.pop("results")
    return summary


def _diagnose_editing(args, sampler, tok, image_tok, image_size: int) -> dict:
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
            sampler, tok, image_tok, edits, args.guidance_scale, args.image_guidance_scale,
            TokenSampling(args.temperature, args.top_k), seed=args.seed,
            batch_size=args.batch_size, center_tol=args.center_tol)
        print(f"-- {kind}\n{format_diagnosis(result[kind])}")
    return result


def _sampler(args, model, loss, tok, image_tok):
    """The family's sampler, with ``--guidance-interval`` applied (Transfusion only)."""
    from fusion.families import family_sampler
    from fusion.models.diffusion import check_guidance_interval

    sampler = family_sampler(model, loss, tok, image_tok)
    if args.guidance_interval is FROM_MODEL:
        return sampler
    if not hasattr(sampler, "guidance_interval"):
        raise ValueError("--guidance-interval is a diffusion setting: Transfusion models only")
    given = args.guidance_interval
    if given == ["none"]:
        interval = [0.0, 1.0]  # every sampler step has 0 < t/T <= 1
    else:
        try:
            interval = [float(x) for x in given]
        except ValueError:
            raise ValueError(f"--guidance-interval takes LO HI or 'none', got {given}") from None
        check_guidance_interval(interval)
    sampler.guidance_interval = interval
    return sampler


def cmd_model(args) -> dict:
    """What the main job's evaluation stage runs, for any saved model folder."""
    from fusion.eval.model import ModelEvalConfig, evaluate_model
    from fusion.families.folders import load_model

    if args.world_seeds and args.world_seed:
        raise ValueError("give --world-seed or --world-seeds, not both")
    model, loss, tok, image_tok, meta = load_model(args.model, image_tokenizer=args.image_tokenizer)
    model.to(args.device), image_tok.to(args.device)
    sampling = _resolve_sampling(args, meta)
    world_seeds = args.world_seeds or [args.world_seed]
    sampler = _sampler(args, model, loss, tok, image_tok)
    if hasattr(sampler, "guidance_interval"):
        sampling["guidance_interval"] = (sampler.guidance_interval
                                         or sampler.diffusion.cfg.guidance_interval)
        print(f"guidance_interval={sampling['guidance_interval']}")
    per_set = {}
    for world_seed in world_seeds:
        # One prompt set varies by far more than its binomial error (docs/results.md), so
        # several sets are the way to compare models; each gets its own sampling seed.
        seed = args.seed + (world_seed if len(world_seeds) > 1 else 0)
        cfg = ModelEvalConfig(images_per_tag=args.images_per_tag,
                              caption_images=args.caption_images,
                              guidance_scale=args.guidance_scale, diffusion_steps=args.steps,
                              temperature=args.temperature, top_k=args.top_k,
                              batch_size=args.batch_size, seed=seed, fid=not args.no_fid)
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


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:18]))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", type=Path, help="also write the summary to this JSON file")
    common.add_argument("--device", default="cpu")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("geneval", parents=[common], help="score a folder in GenEval's layout")
    g.add_argument("--images", required=True, help="GenEval-layout folder (read, or written)")
    g.add_argument("--outfile", help="per-image results.jsonl (default: <images>/results.jsonl)")
    g.add_argument("--detector", choices=["shapes", "mask2former"], default="shapes")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--ground-truth", action="store_true",
                      help="first render each prompt's ShapesWorld scenes into --images")
    mode.add_argument("--noise", action="store_true",
                      help="first write uniform-noise images for each prompt into --images")
    g.add_argument("--prompts", help="prompt file for --ground-truth/--noise (default: the "
                                     "ShapesWorld prompt set of --seed)")
    g.add_argument("--per-prompt", type=int, default=4, help="images per prompt written")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--grid", action="store_true", help="also write grid.png per prompt")
    g.add_argument("--overwrite", action="store_true", help="replace prompt folders there")
    g.add_argument("--detector-config", help="mask2former: mmdet config file")
    g.add_argument("--detector-checkpoint", help="mask2former: checkpoint .pth")
    g.add_argument("--clip-weights", help="mask2former: open_clip ViT-L-14 weights file")
    g.add_argument("--object-names", help="mask2former: GenEval's object_names.txt")
    g.set_defaults(fn=cmd_geneval)

    f = sub.add_parser("fid", parents=[common], help="FID (and KID) between two image sets")
    f.add_argument("--real", required=True, help="folder, 'shapes' or 'noise'")
    f.add_argument("--fake", required=True, help="folder, 'shapes' or 'noise'")
    f.add_argument("--n", type=int, default=2000, help="images of a 'shapes'/'noise' set")
    f.add_argument("--seed", type=int, default=0, help="ShapesWorld seed of 'shapes' sets")
    f.add_argument("--real-start", type=int, default=50_000, help="first scene of real 'shapes'")
    f.add_argument("--fake-start", type=int, default=52_000, help="first scene of fake 'shapes'")
    f.add_argument("--size", type=int, default=64)
    f.add_argument("--resize", choices=["center_crop", "resize", "pad"],
                   help="bring folder images to --size by this policy (default: sizes must match)")
    f.add_argument("--limit", type=int, help="use at most this many images of a folder")
    f.add_argument("--feature", default="shapes",
                   help="shapes | inception | a JSON {\"_target_\": ...} network")
    f.add_argument("--weights", "--inception-weights", dest="weights",
                   help="shapes network folder, or the local Inception weights file")
    f.add_argument("--kid", action=argparse.BooleanOptionalAction, default=None,
                   help="also compute KID (default: with the shapes network)")
    f.add_argument("--cache-dir", default="default",
                   help="real-statistics cache (default ~/.cache/fusion/fid; 'none': off)")
    f.set_defaults(fn=cmd_fid)

    r = sub.add_parser("reconstruction", parents=[common], help="PSNR / SSIM / attribute accuracy")
    r.add_argument("--originals", help="folder of originals")
    r.add_argument("--reconstructions", help="folder of reconstructions, same order")
    r.add_argument("--vae", help="a VAE tokenizer folder: reconstruct --n held-out ShapesWorld "
                                 "scenes and add the reconstruction FID/KID (shapes features)")
    r.add_argument("--n", type=int, default=2000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--no-attributes", action="store_true", help="skip the detector check")
    r.set_defaults(fn=cmd_reconstruction)

    # sampling a model (editing, model): one set of options
    sampling = argparse.ArgumentParser(add_help=False)
    # Defaults: the model's recorded recipe settings (FROM_MODEL), else SamplingConfig's.
    sampling.add_argument("--steps", type=int, default=FROM_MODEL,
                          help="Transfusion: diffusion steps (default: the model's, else 25)")
    sampling.add_argument("--temperature", type=float, default=FROM_MODEL,
                          help="Chameleon: image codes (default: the model's, else 1.0)")
    sampling.add_argument("--top-k", type=int, default=FROM_MODEL,
                          help="Chameleon: image codes (default: the model's, else none)")
    sampling.add_argument("--guidance-interval", nargs="+", default=FROM_MODEL,
                          metavar="LO HI", help="Transfusion: guide only at noise levels t/T in "
                          "(LO, HI]; 'none': at every step (default: the model's)")
    sampling.add_argument("--image-tokenizer", help="a copy of the image tokenizer the model was "
                          "trained with, when its recorded path now holds another artifact")
    sampling.add_argument("--batch-size", type=int, default=64)
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed")
    sampling.add_argument("--world-seed", type=int, default=0, help="ShapesWorld seed")

    e = sub.add_parser("editing", parents=[common, sampling],
                       help="edit accuracy per kind + PSNR on held-out ShapesWorld edits")
    e.add_argument("--model", help="a fine-tuned model folder (<output_dir>/model)")
    ref = e.add_mutually_exclusive_group()
    ref.add_argument("--ground-truth", action="store_true",
                     help="score the true targets instead of a model (sanity check)")
    ref.add_argument("--unedited", action="store_true",
                     help="score the unedited sources instead of a model (sanity check)")
    ref.add_argument("--tokenizer-ceiling", metavar="ARTIFACT",
                     help="score the true targets through this image tokenizer "
                          "(decode(encode(target))): the best a model using it can reach")
    e.add_argument("--local-targets", action="store_true",
                   help="with --tokenizer-ceiling <VQ-GAN>: the targets' codes as "
                        "edit_target_codes=local trains them (source codes away from the edit)")
    e.add_argument("--diagnose", action="store_true",
                   help="with --model <Chameleon>: split its errors into the cells it should "
                        "copy and the cells that change (teacher-forced and sampled)")
    e.add_argument("--per-kind", type=int, default=100, help="edits of each kind")
    e.add_argument("--guidance-scale", type=_optional_float, default=FROM_MODEL,
                   help="guidance over the instruction ('none': off; default: the model's, "
                        "else 3)")
    e.add_argument("--image-guidance-scale", type=_optional_float, default=FROM_MODEL,
                   help="guidance over the source image ('none': off; default: the model's, "
                        "else 1.5)")
    e.add_argument("--start", type=int, default=1_000_000, help="first held-out scene")
    e.add_argument("--size", type=int, default=64, help="image size of the sanity checks")
    e.add_argument("--center-tol", type=float, help="pixels (default: image size / 16)")
    e.add_argument("--grid", type=Path, help="save source | output | target cells here")
    e.add_argument("--keep-results", action="store_true",
                   help="keep the per-edit results in the --json summary")
    e.set_defaults(fn=cmd_editing)

    m = sub.add_parser("model", parents=[common, sampling],
                       help="GenEval-shapes, FID-shapes and captioning of a trained model")
    m.add_argument("--model", required=True, help="a model folder (<output_dir>/model)")
    m.add_argument("--images-per-tag", type=int, default=100)
    m.add_argument("--caption-images", type=int, default=200)
    m.add_argument("--guidance-scale", type=_optional_float, default=FROM_MODEL,
                   help="classifier-free guidance ('none': off; default: the model's, else 3)")
    m.add_argument("--no-fid", action="store_true", help="skip FID-shapes")
    m.add_argument("--world-seeds", type=int, nargs="+", metavar="W",
                   help="score the prompt sets of several ShapesWorld seeds and pool them "
                        "(set W is sampled with seed --seed + W); e.g. --world-seeds 0 1 2")
    m.add_argument("--grid", type=Path, help="save a grid of generated images here")
    m.set_defaults(fn=cmd_model)

    args = parser.parse_args(argv)
    try:
        result = args.fn(args)
    except (FileExistsError, ValueError, ModuleNotFoundError) as err:
        # fusion.eval reports bad folders, options and missing extras with these: what the
        # user passed, so one `error:` line (report_user_errors), not a traceback
        if isinstance(err, UserError):
            raise
        raise UserError(str(err)) from err
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
