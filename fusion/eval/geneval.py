"""GenEval: object-focused text-to-image scoring (Ghosh et al. 2023, arXiv:2310.11513).

This follows the official scorer, ``evaluation/evaluate_images.py`` and
``evaluation/summary_scores.py`` of github.com/djghosh13/geneval, rule for rule; each rule
below cites the line of thought it copies ([G] = ``evaluate_images.py``):

1. Confidence threshold: a detection counts when its score is *strictly above* 0.3, or above
   0.9 when the prompt's tag is ``counting`` ([G] ``THRESHOLD``, ``COUNTING_THRESHOLD``;
   ``bbox[..., 4] > confidence_threshold``).
2. At most 16 objects per class, the most confident first ([G] ``MAX_OBJECTS``), then optional
   greedy NMS (``max_overlap``; 1.0 = off, the official default).
3. ``include`` clauses are ANDed: class C with count n needs at least n detections of C; the
   n most confident are the ones checked further ([G] ``evaluate``: ``objects[C][:n]``).
   Counting is *exact* because its prompts also carry ``exclude: {C, n + 1}``.
4. ``exclude`` clauses: the image fails when the class has at least ``count`` detections.
5. Colour: the checked objects' colours (from the detector: CLIP in GenEval, the palette for
   ShapesWorld) must include the asked colour at least n times.
6. Position ``[relation, i]``: every checked object must stand in ``relation`` to every object
   of include group i, which must itself have matched. The relation of A to B is GenEval's
   ``relative_position``: the centre offset shrunk by 0.1 * (size A + size B) per axis, then
   normalised by the raw offset's length, must exceed 0.5 along the axis; when the shrunk
   offset vanishes there is no relation at all (:func:`fusion.data.shapes.relative_position`).
7. Scores ([S] ``summary_scores.py``): per task, the mean correctness of its images; overall,
   the mean of the task scores. Here only the tags present are averaged, and the result says
   which.

The folder layout is GenEval's, so its scripts can score our samples and we can score theirs::

    <dir>/00000/metadata.jsonl     the prompt's record (one JSON object)
    <dir>/00000/samples/0000.png   4 images per prompt by default
    <dir>/00000/grid.png           optional

Per-image results are written in the official ``results.jsonl`` format (``filename``, ``tag``,
``prompt``, ``correct``, ``reason``, ``metadata``, ``details``), plus ``colors``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from fusion.data.images import save_grid, to_rgb
from fusion.data.prompts import PromptRecord, read_prompts
from fusion.data.shapes import POSITION_MARGIN, TAGS, ShapesWorld, relative_position
from fusion.eval.detectors import GENEVAL_COLORS, Detection, Detector

log = logging.getLogger(__name__)

SAMPLES_PER_PROMPT = 4  # GenEval generates 4 images per prompt
_SAMPLE_NAME = re.compile(r"\d+\.png")  # [G] main(): re.match(r"\d+\.png", name)

ImageLike = np.ndarray | str | Path


@dataclass(frozen=True)
class GenEvalRules:
    """The official scorer's options ([G] ``--options``), with its defaults."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # NMS IoU; 1.0 keeps everything (the official default)
    position_threshold: float = POSITION_MARGIN  # 0.1


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------
def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """[G] ``compute_iou``: IoU with the inclusive-pixel (+1) area convention."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(detections: Sequence[Detection], tag: str,
                    rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """Rules 1-2: per class, most confident first, above the tag's threshold, at most
    ``max_objects``, then greedy NMS when ``max_overlap < 1`` ([G] ``evaluate_image``)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.class_name, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for name, dets in by_class.items():
        ordering = sorted(dets, key=lambda d: -d.score)  # stable: ties keep detector order
        ordering = [d for d in ordering if d.score > threshold][:rules.max_objects]
        chosen: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1:
                ordering = [d for d in ordering if box_iou(best.bbox, d.bbox) < rules.max_overlap]
        if chosen:
            kept[name] = chosen
    return kept


def check_image(objects: Mapping[str, Sequence[Detection]], record: PromptRecord,
                rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """Rules 3-6 on kept detections (:func:`keep_detections`): ``(correct, reason)``.

    A transcription of [G] ``evaluate``; reasons use its wording.
    """
    correct = True
    reason: list[str] = []
    matched_groups: list[Sequence[Detection] | None] = []
    for j, req in enumerate(record.include):
        name, count = req["class"], req.get("count", 1)
        matched = True
        found = list(objects.get(name, []))[:count]
        if len(found) < count:
            correct = matched = False
            reason.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if any(c is None for c in colors):
                    raise ValueError(f"prompt {record.prompt!r} asks for a colour but the "
                                     f"detector gave no colour for {name}")
                if colors.count(req["color"]) < count:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {name}>={count}, found "
                        f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS
                                    if c in colors))
            if "position" in req and matched:
                expected, target = req["position"]
                if target >= j:
                    raise ValueError(f"prompt {record.prompt!r}: include clause {j} is placed "
                                     f"relative to clause {target}, which does not come before it")
                if matched_groups[target] is None:
                    correct = matched = False
                    reason.append(f"no target for {name} to be {expected}")
                else:
                    for obj in found:
                        for other in matched_groups[target]:
                            true_rels = relative_position(obj.bbox, other.bbox,
                                                          rules.position_threshold)
                            if expected not in true_rels:
                                correct = matched = False
                                reason.append(f"expected {name} {expected} target, found "
                                              f"{' and '.join(sorted(true_rels))} target")
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in record.exclude:
        name, count = req["class"], req.get("count", 1)
        if len(objects.get(name, [])) >= count:
            correct = False
            reason.append(f"expected {name}<{count}, found {len(objects[name])}")
    return correct, "\n".join(reason)


@dataclass(frozen=True)
class ImageResult:
    """One scored image; :meth:`to_json` is a row of the official ``results.jsonl``."""

    filename: str
    record: PromptRecord
    correct: bool
    reason: str
    detected: dict[str, list[Detection]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "filename": self.filename,
            "tag": self.record.tag,
            "prompt": self.record.prompt,
            "correct": self.correct,
            "reason": self.reason,
            "metadata": json.dumps(self.record.to_json()),
            # [G]: class -> [[x0, y0, x1, y1, score], ...]
            "details": json.dumps({name: [[*d.bbox, d.score] for d in dets]
                                   for name, dets in self.detected.items()}),
            "colors": json.dumps({name: [d.color for d in dets]
                                  for name, dets in self.detected.items()}),
        }


def evaluate_image(image: ImageLike, record: PromptRecord, detector: Detector,
                   rules: GenEvalRules = GenEvalRules(), filename: str = "") -> ImageResult:
    """Detect, keep (rules 1-2) and check (rules 3-6) one image against its prompt."""
    if isinstance(image, str | Path):
        filename = filename or str(image)
        image = load_image(image)
    image = _check_array(image, filename or record.prompt)
    objects = keep_detections(detector(image), record.tag, rules)
    correct, reason = check_image(objects, record, rules)
    return ImageResult(filename, record, correct, reason, objects)


def summarize(results: Sequence[ImageResult]) -> dict:
    """Rule 7 ([S]): task scores, their mean over the tags present, and per-prompt figures."""
    if not results:
        raise ValueError("no scored images to summarize")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in results:
        by_tag.setdefault(r.record.tag, []).append(r.correct)
        by_prompt.setdefault(json.dumps(r.record.to_json(), sort_keys=True), []).append(r.correct)
    tags = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
    tasks = {t: {"score": float(np.mean(by_tag[t])), "correct": int(sum(by_tag[t])),
                 "images": len(by_tag[t])} for t in tags}
    return {
        "overall": float(np.mean([tasks[t]["score"] for t in tags])),
        "tasks": tasks,
        "tags": tags,  # the tags the overall score averages over
        "missing_tags": [t for t in TAGS if t not in by_tag],
        "images": len(results),
        "prompts": len(by_prompt),
        "correct_images": float(np.mean([r.correct for r in results])),
        "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])),
        # Share of images in which no object survived rules 1-2: a failure mode of its own
        # (small diffusion models often draw an empty scene), not a wrong class or colour.
        "empty_images": float(np.mean([not any(r.detected.values()) for r in results])),
    }


def score_geneval(images_by_prompt: Sequence[Sequence[ImageLike]],
                  prompts: Sequence[PromptRecord], detector: Detector,
                  rules: GenEvalRules = GenEvalRules(), progress: bool = True,
                  outfile: str | Path | None = None) -> dict:
    """Score images against their prompts by GenEval's rules.

    Args:
        images_by_prompt: for each prompt, its images: uint8 (H, W, 3) arrays or image paths.
        prompts: the prompt records (``fusion.data.prompts``), aligned with the images.
        detector: any :class:`~fusion.eval.detectors.Detector`.
        outfile: where to write per-image results in the official ``results.jsonl`` format.

    Returns:
        :func:`summarize`'s dict plus ``results``: the per-image :class:`ImageResult` list.
    """
    if len(images_by_prompt) != len(prompts):
        raise ValueError(f"got images for {len(images_by_prompt)} prompts but {len(prompts)} "
                         "prompt records")
    if not prompts:
        raise ValueError("no prompts to score")
    results: list[ImageResult] = []
    total = sum(len(imgs) for imgs in images_by_prompt)
    with tqdm(total=total, desc="GenEval", unit="img", disable=not progress) as bar:
        for i, (record, images) in enumerate(zip(prompts, images_by_prompt, strict=True)):
            if len(images) == 0:
                raise ValueError(f"prompt {i} ({record.prompt!r}) has no images")
            for j, image in enumerate(images):
                name = str(image) if isinstance(image, str | Path) else f"{i:05d}/{j:04d}"
                results.append(evaluate_image(image, record, detector, rules, name))
                bar.update()
    if outfile is not None:
        write_results(results, outfile)
    return {**summarize(results), "results": results}


def write_results(results: Sequence[ImageResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r.to_json()) + "\n")
    return path


def format_summary(summary: Mapping) -> str:
    """A table like ``summary_scores.py`` prints."""
    lines = [f"{'task':<16} {'score':>7}  correct / images"]
    for tag in summary["tags"]:
        t = summary["tasks"][tag]
        lines.append(f"{tag:<16} {t['score']:>7.2%}  {t['correct']} / {t['images']}")
    lines.append(f"{'overall':<16} {summary['overall']:>7.4f}  (mean over "
                 f"{len(summary['tags'])} tasks)")
    if summary["missing_tags"]:
        lines.append(f"missing tags: {', '.join(summary['missing_tags'])}")
    lines.append(f"{'no object found':<16} {summary['empty_images']:>7.2%}  of the images")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# GenEval's folder layout
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenEvalEntry:
    """One prompt folder: its record and its sample image paths (sorted by number)."""

    index: int
    record: PromptRecord
    images: tuple[Path, ...]


def write_geneval_folder(out_dir: str | Path, prompts: Sequence[PromptRecord],
                         images_by_prompt: Sequence[Sequence[np.ndarray]], grid: bool = False,
                         overwrite: bool = False) -> Path:
    """Write samples in GenEval's layout (see the module docstring).

    Prompt folder ``NNNNN`` holds ``prompts[N]``; ``overwrite`` replaces prompt folders already
    there (without it, a folder that already holds prompt folders is refused, so two runs
    never mix).
    """
    if len(images_by_prompt) != len(prompts):
        raise ValueError(f"got images for {len(images_by_prompt)} prompts but {len(prompts)} "
                         "prompt records")
    out = Path(out_dir)
    existing = _prompt_dirs(out) if out.is_dir() else []
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already holds {len(existing)} GenEval prompt folders; "
                                  "pass overwrite=True (--overwrite) to replace them")
        for d in existing:
            shutil.rmtree(d)
    for i, (record, images) in enumerate(tqdm(list(zip(prompts, images_by_prompt, strict=True)),
                                              desc="writing", unit="prompt",
                                              disable=len(prompts) < 50)):
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        # [G] reads it with json.load: one object, despite the .jsonl name.
        (folder / "metadata.jsonl").write_text(json.dumps(record.to_json()))
        arrays = [_check_array(img, f"prompt {i} image {j}") for j, img in enumerate(images)]
        for j, img in enumerate(arrays):
            Image.fromarray(img).save(folder / "samples" / f"{j:04d}.png")
        if grid and arrays:
            save_grid(arrays, folder / "grid.png", columns=len(arrays), scale=1)
    return out


def read_geneval_folder(folder: str | Path) -> list[GenEvalEntry]:
    """Read GenEval's layout (ours or the official generation scripts'): prompt folders in
    numeric order, each with its record and its ``<digits>.png`` samples."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"GenEval image folder {str(root)!r} does not exist")
    dirs = _prompt_dirs(root)
    if not dirs:
        raise ValueError(f"{root} holds no GenEval prompt folders (<NNNNN>/metadata.jsonl with "
                         "<NNNNN>/samples/<NNNN>.png)")
    entries = []
    for d in dirs:
        records = read_prompts(d / "metadata.jsonl")
        if len(records) != 1:
            raise ValueError(f"{d / 'metadata.jsonl'}: expected one prompt record, got "
                             f"{len(records)}")
        samples = d / "samples"
        images = sorted((p for p in samples.iterdir() if p.is_file()
                         and _SAMPLE_NAME.fullmatch(p.name)), key=lambda p: int(p.stem)) \
            if samples.is_dir() else []
        if not images:
            raise ValueError(f"{samples} holds no sample images (<NNNN>.png)")
        entries.append(GenEvalEntry(int(d.name), records[0], tuple(images)))
    return entries


def score_geneval_folder(folder: str | Path, detector: Detector,
                         outfile: str | Path | None = None,
                         rules: GenEvalRules = GenEvalRules(), progress: bool = True) -> dict:
    """Score a GenEval-layout folder; ``outfile`` gets the official ``results.jsonl``."""
    entries = read_geneval_folder(folder)
    return score_geneval([e.images for e in entries], [e.record for e in entries], detector,
                         rules, progress, outfile)


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3), EXIF orientation applied (as [G] does)."""
    try:
        with Image.open(path) as img:
            return np.asarray(to_rgb(ImageOps.exif_transpose(img)))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from err


def is_geneval_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds GenEval prompt folders (``<NNNNN>/metadata.jsonl``)."""
    root = Path(folder)
    return root.is_dir() and bool(_prompt_dirs(root))


def _prompt_dirs(root: Path) -> list[Path]:
    # [G] main(): sub-folders whose name is all digits.
    return sorted((d for d in root.iterdir() if d.is_dir() and d.name.isdigit()
                   and (d / "metadata.jsonl").is_file()), key=lambda d: int(d.name))


def _check_array(image: object, where: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{where}: expected a uint8 (H, W, 3) image, got {arr.dtype} "
                         f"{arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------
# ShapesWorld ground truth
# --------------------------------------------------------------------------------------------
def shapes_ground_truth(prompts: Sequence[PromptRecord], world: ShapesWorld,
                        per_prompt: int = SAMPLES_PER_PROMPT,
                        max_scan: int = 300_000, progress: bool = True) -> list[list[np.ndarray]]:
    """Ground-truth renders for ShapesWorld prompt records (``shapes_prompt_set``).

    Each record carries ``shapes_index``, one scene that satisfies it; further scenes with the
    same prompt are found by scanning ``world`` (scenes ``0 .. max_scan - 1``, captions only,
    no rendering) so that each prompt gets up to ``per_prompt`` distinct renders.
    """
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    missing = [p.prompt for p in prompts if "shapes_index" not in p.extra]
    if missing:
        raise ValueError(f"{len(missing)} prompt records have no 'shapes_index' (first: "
                         f"{missing[0]!r}); ground truth needs a ShapesWorld prompt set "
                         "(fusion.data.prompts.shapes_prompt_set)")
    found: dict[tuple[str, str], list[int]] = {}
    for p in prompts:
        found.setdefault((p.tag, p.prompt), [p.extra["shapes_index"]])
    if per_prompt > 1:
        todo = {k for k, v in found.items() if len(v) < per_prompt}
        for index in tqdm(range(max_scan), desc="finding scenes", unit="scene",
                          disable=not progress, mininterval=1.0):
            for tag, row in world.prompts(index).items():
                key = (tag, row["prompt"])
                if key in todo and index not in found[key]:
                    found[key].append(index)
                    if len(found[key]) >= per_prompt:
                        todo.discard(key)
            if not todo:
                break
        if todo:
            log.warning("%d prompts have fewer than %d scenes in the first %d", len(todo),
                        per_prompt, max_scan)
    return [[world.image(i) for i in found[(p.tag, p.prompt)]] for p in prompts]

