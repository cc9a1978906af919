"""Evaluate images and models: GenEval scoring, FID/KID, reconstruction, editing, models,
interleaved generation, held-out text loss.

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
    # interleaved generation: image counts and text-image consistency on held-out stories
    python scripts/evaluate.py interleaved --model outputs/train/interleaved_transfusion_tiny/model
    # held-out text loss: next-token loss on 256 captions of unseen scenes
    python scripts/evaluate.py text --model outputs/train/transfusion_tiny/model

`model`, `editing` and `interleaved` share their batches over several processes, with the same
scores as one process (docs/scaling.md):
    torchrun --nproc-per-node 4 scripts/evaluate.py model --model ... --device cuda

A plain argparse CLI rather than a Hydra entry point: it composes no model, trainer or data
config; it reads folders and writes a results file, and Hydra's run-directory handling would
only get in the way of relative paths. Each sub-command is a function of fusion.jobs.evaluate;
training-time evaluation calls fusion.eval directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusion.config import SamplingConfig
from fusion.distributed import process_group_from_env, quiet_other_ranks
from fusion.errors import UserError, report_user_errors
from fusion.eval.editing import EditEvalConfig
from fusion.eval.interleaved import InterleavedEvalConfig
from fusion.eval.model import ModelEvalConfig
from fusion.jobs.evaluate import (
    FROM_MODEL,
    cmd_editing,
    cmd_fid,
    cmd_geneval,
    cmd_interleaved,
    cmd_model,
    cmd_reconstruction,
    cmd_text,
    optional_float,
)


@report_user_errors
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])  # the examples
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
    sampling.add_argument("--batch-size", type=int, default=ModelEvalConfig.batch_size)
    sampling.add_argument("--seed", type=int, default=SamplingConfig.seed, help="sampling seed")
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
    e.add_argument("--per-kind", type=int, default=EditEvalConfig.per_kind,
                   help="edits of each kind")
    e.add_argument("--guidance-scale", type=optional_float, default=FROM_MODEL,
                   help="guidance over the instruction ('none': off; default: the model's, "
                        "else 3)")
    e.add_argument("--image-guidance-scale", type=optional_float, default=FROM_MODEL,
                   help="guidance over the source image ('none': off; default: the model's, "
                        "else 1.5)")
    e.add_argument("--start", type=int, default=EditEvalConfig.heldout_start,
                   help="first held-out scene")
    e.add_argument("--size", type=int, default=64, help="image size of the sanity checks")
    e.add_argument("--center-tol", type=float, help="pixels (default: image size / 16)")
    e.add_argument("--grid", type=Path, help="save source | output | target cells here")
    e.add_argument("--keep-results", action="store_true",
                   help="keep the per-edit results in the --json summary")
    e.set_defaults(fn=cmd_editing)

    m = sub.add_parser("model", parents=[common, sampling],
                       help="GenEval-shapes, FID-shapes and captioning of a trained model")
    m.add_argument("--model", required=True, help="a model folder (<output_dir>/model)")
    # Defaults: the evaluation configs' (fusion.eval.model / editing), one set for every caller.
    m.add_argument("--images-per-tag", type=int, default=ModelEvalConfig.images_per_tag)
    m.add_argument("--caption-images", type=int, default=ModelEvalConfig.caption_images)
    m.add_argument("--guidance-scale", type=optional_float, default=FROM_MODEL,
                   help="classifier-free guidance ('none': off; default: the model's, else 3)")
    m.add_argument("--no-fid", action="store_true", help="skip FID-shapes")
    m.add_argument("--world-seeds", type=int, nargs="+", metavar="W",
                   help="score the prompt sets of several ShapesWorld seeds and pool them "
                        "(set W is sampled with seed --seed + W); e.g. --world-seeds 0 1 2")
    m.add_argument("--grid", type=Path, help="save a grid of generated images here")
    m.add_argument("--keep-images", metavar="DIR",
                   help="also write the scored images here in GenEval's folder layout "
                        "(<DIR>/world<W> for each of several --world-seeds)")
    m.set_defaults(fn=cmd_model)

    i = sub.add_parser("interleaved", parents=[common, sampling],
                       help="interleaved generation: image counts and text-image consistency "
                            "on held-out ShapesWorld stories")
    i.add_argument("--model", required=True, help="a model folder (<output_dir>/model)")
    i.add_argument("--prompts", type=int, default=InterleavedEvalConfig.num_prompts,
                   help="held-out story prompts")
    i.add_argument("--start", type=int, default=InterleavedEvalConfig.heldout_start,
                   help="first held-out story")
    i.add_argument("--max-new-tokens", type=int, default=InterleavedEvalConfig.max_new_tokens,
                   help="text tokens the model may write per document")
    i.add_argument("--max-images", type=int, default=InterleavedEvalConfig.max_images)
    i.add_argument("--guidance-scale", type=optional_float, default=FROM_MODEL,
                   help="classifier-free guidance of each image ('none': off; default: the "
                        "model's, else 3)")
    i.add_argument("--page", type=Path, help="write the documents here as a Markdown page "
                                             "with their PNGs")
    i.set_defaults(fn=cmd_interleaved)

    t = sub.add_parser("text", parents=[common],
                       help="held-out text loss: next-token loss on unseen captions")
    t.add_argument("--model", required=True, help="a model folder (<output_dir>/model)")
    t.add_argument("--documents", type=int, default=256, help="held-out captions scored")
    t.add_argument("--world-seed", type=int, default=0, help="ShapesWorld seed of the captions")
    t.add_argument("--image-tokenizer", help="a copy of the image tokenizer the model was "
                                             "trained with, instead of the folder's own")
    t.set_defaults(fn=cmd_text)

    args = parser.parse_args(argv)
    with process_group_from_env() as (size, rank):  # torchrun's group, when there is one
        if size > 1 and args.fn not in (cmd_model, cmd_editing, cmd_interleaved):
            raise UserError(f"{args.fn.__name__.removeprefix('cmd_')} scores files in one "
                            "process; only model, editing and interleaved split over processes "
                            "(launch it without torchrun)")
        quiet_other_ranks()
        try:
            result = args.fn(args)
        except (FileExistsError, ValueError, ModuleNotFoundError) as err:
            # fusion.eval reports bad folders, options and missing extras with these: what the
            # user passed, so one `error:` line (report_user_errors), not a traceback
            if isinstance(err, UserError):
                raise
            raise UserError(str(err)) from err
        if args.json and rank == 0:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
