"""Model folders: a trained family model as ``config.json`` + ``model.safetensors``, with its
own copies of both tokenizers (``tokenizer.json``, ``image_tokenizer/``), the fingerprints that
tie it to them and the sha256 of its weights; saving (atomically) and loading (checked) for
every family (docs/reliability.md, "Integrity of model folders")."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusion.config import resolve_path
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.families import build_family, load_image_tokenizer
from fusion.io import replace_atomically

log = logging.getLogger(__name__)


def text_vocabulary(tokenizer: TextTokenizer) -> list[str]:
    """The tokenizer's tokens in id order: what "the same text vocabulary" means here."""
    return [tokenizer.decode([i], skip_special=False) for i in range(tokenizer.vocab_size)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_tokenizer_fingerprint(tokenizer: TextTokenizer) -> str:
    return _sha256(json.dumps(text_vocabulary(tokenizer)).encode())


def _artifact_file_bytes(f: Path, legacy: bool) -> bytes:
    data = f.read_bytes()
    if legacy or f.name != "config.json":
        return data
    try:  # "info" documents the artifact (metrics, timings); it does not change what it computes
        cfg = json.loads(data)
    except json.JSONDecodeError:
        return data
    return json.dumps({k: v for k, v in cfg.items() if k != "info"}, sort_keys=True).encode()


def image_tokenizer_fingerprint(path, legacy: bool = False) -> str | None:
    """sha256 over a stage-1 artifact's weights and network config (``config.json`` without its
    ``info``; not its card), or None when it is not on disk. Two copies of one artifact agree,
    and re-scoring one (a new ``info``) keeps its fingerprint; a retrained one does not.
    ``legacy``: the older form (every file's raw bytes), which some saved model folders record."""
    path = resolve_path(path)
    if path.is_file():
        return _sha256(path.read_bytes())
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix != ".md"):
        h.update(f.name.encode())
        h.update(hashlib.sha256(_artifact_file_bytes(f, legacy)).digest())
    return h.hexdigest()


def image_tokenizer_matches(recorded: str, path) -> bool:
    """Whether the artifact at ``path`` is the one a model recorded (either fingerprint form)."""
    return (image_tokenizer_fingerprint(path) == recorded  # the legacy form only if needed
            or image_tokenizer_fingerprint(path, legacy=True) == recorded)


# The settings a training recipe records in its model folder (config.json "sampling"): how the
# model is meant to be sampled. Every other SamplingConfig field is the caller's.
RECIPE_SAMPLING_KEYS = ("guidance_scale", "image_guidance_scale", "diffusion_steps", "temperature",
                        "top_k", "top_p")


def recipe_sampling(sampling_cfg) -> dict:
    """The sampling settings a run was configured with, recorded in the model's config.json
    so that sampling the folder later follows its recipe by default."""
    return {k: sampling_cfg[k] for k in RECIPE_SAMPLING_KEYS if k in sampling_cfg}


def recorded_sampling(meta: dict) -> dict:
    """The recipe settings a model folder's config.json recorded, with SamplingConfig's
    defaults for any it lacks (folders saved before models recorded them)."""
    from fusion.config import SamplingConfig

    recorded, fallback = meta.get("sampling") or {}, SamplingConfig()
    return {k: recorded.get(k, getattr(fallback, k)) for k in RECIPE_SAMPLING_KEYS}


def model_sampling(settings, meta: dict, given=()) -> tuple:
    """The one rule for sampling a model folder, used by scripts/sample.py, scripts/edit.py,
    scripts/evaluate.py and the main job: each recipe setting (:data:`RECIPE_SAMPLING_KEYS`)
    is the one the folder recorded, unless ``given`` names it (set on the command line); every
    other field, and a recipe setting the folder did not record, is ``settings``'s.
    ``settings``: a SamplingConfig (or a node of one).

    Returns (the settings as a SamplingConfig, {setting: value taken from the model})."""
    from fusion.config import SamplingConfig, to_dataclass

    settings = to_dataclass(settings, SamplingConfig)
    recorded = meta.get("sampling") or {}  # a folder saved before this: settings' defaults
    taken = {k: recorded[k] for k in RECIPE_SAMPLING_KEYS if k in recorded and k not in given}
    return dataclasses.replace(settings, **taken), taken


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


TOKENIZER_COPY = "tokenizer.json"  # a model folder's own copy of its text tokenizer
IMAGE_TOKENIZER_COPY = "image_tokenizer"  # ... and of its stage-1 image tokenizer artifact


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_image_tokenizer(source, folder: Path) -> Path | None:
    """Copy the stage-1 artifact at ``source`` into ``folder/image_tokenizer/``: a folder's
    files (``config.json``, the weights, its card), or a single weights file as it is named.
    The copy is made in a temporary folder beside it and renamed into place, so
    ``image_tokenizer/`` is either a whole copy or absent (or the previous one). Returns the
    copy, or None when ``source`` is not on disk (nothing is copied)."""
    src = resolve_path(source)
    if not (src.is_dir() or src.is_file()):
        log.warning("image tokenizer %s not found: the model folder holds no copy of it", source)
        return None
    dst = folder / IMAGE_TOKENIZER_COPY
    tmp = folder / f".{IMAGE_TOKENIZER_COPY}.tmp-{os.getpid()}"
    old = folder / f".{IMAGE_TOKENIZER_COPY}.old-{os.getpid()}"
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]
    for stale in (tmp, old):
        _remove(stale)
    try:
        tmp.mkdir()
        for f in files:
            shutil.copyfile(f, tmp / f.name)  # a link's target, not the link
            _fsync(tmp / f.name)
        if dst.exists() or dst.is_symlink():
            dst.rename(old)
        tmp.rename(dst)
    finally:
        _remove(tmp)
        _remove(old)
    return dst


def folder_image_tokenizer_copy(folder: Path) -> Path | None:
    """A model folder's own copy of its image tokenizer (what :func:`save_model` writes): the
    ``image_tokenizer/`` folder, or the one weights file in it when the artifact was a file;
    None for a folder saved before copies."""
    copy = folder / IMAGE_TOKENIZER_COPY
    if not copy.is_dir():
        return None
    if (copy / "config.json").is_file():
        return copy
    files = [p for p in copy.iterdir() if p.is_file() and p.suffix != ".md"]
    return files[0] if len(files) == 1 else copy


def save_model(out_dir, model, model_cfg, tokenizer_path: str, image_tokenizer_path: str,
               extra: dict | None = None):
    """A trained family model as ``config.json`` + ``model.safetensors`` (no pickle).

    The folder holds its own copies of both tokenizers (``tokenizer.json``, and the stage-1
    artifact as ``image_tokenizer/``), so it is complete without the repository: laid out as a
    Hugging Face Hub repository, ``huggingface_hub.upload_folder`` publishes it as it is.
    ``config.json`` also holds fingerprints of both tokenizers, which ``init_from`` and loading
    check, and the sha256 of ``model.safetensors`` (``weights_sha256``), which loading checks.
    config.json (and the model card, ``README.md``) are removed first and written last, each
    file through a temporary one, so a crash while saving leaves a folder that refuses to load
    rather than a config that describes weights or an image tokenizer it does not hold."""
    from safetensors.torch import save_model as save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(
        model_cfg, DictConfig) else dataclasses.asdict(model_cfg)
    tok = TextTokenizer.from_file(resolve_path(tokenizer_path))
    meta = {"model": cfg, "vocab_size": model.vocab_size, "text_tokenizer": tokenizer_path,
            "image_tokenizer": image_tokenizer_path,
            "text_tokenizer_sha256": text_tokenizer_fingerprint(tok),
            "image_tokenizer_sha256": image_tokenizer_fingerprint(image_tokenizer_path),
            **(extra or {})}
    cfg_file, weights = out / "config.json", out / "model.safetensors"
    for stale in (cfg_file, out / "README.md"):  # they describe the weights being replaced
        stale.unlink(missing_ok=True)
    # its own copy of the text tokenizer: the folder is complete without the repository
    replace_atomically(out / TOKENIZER_COPY, lambda tmp: tmp.write_text(tok.to_json()))
    copy_image_tokenizer(image_tokenizer_path, out)
    replace_atomically(weights, lambda tmp: save_safetensors(model, str(tmp)))
    meta["weights_sha256"] = file_sha256(weights)
    replace_atomically(cfg_file, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    write_model_card(out, meta)
    return out


def record_scores(folder, scores: dict) -> None:
    """Add measured scores (numbers; e.g. evaluate_model's) to a model folder's config.json
    (``scores``) and its model card. The weights and their sha256 are untouched."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    meta = read_model_config(cfg_file)
    meta["scores"] = {k: v for k, v in scores.items()
                      if isinstance(v, int | float) and not isinstance(v, bool)}
    replace_atomically(cfg_file, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    write_model_card(folder, meta)


def write_model_card(folder: Path, meta: dict) -> Path:
    """``README.md``: the model card a Hugging Face Hub repository shows (YAML metadata, then
    what the model is, how it was trained, how to load it, its measured scores). Written from
    ``config.json``; nothing is uploaded."""
    family = (meta.get("model") or {}).get("family", "?")
    sampling = ", ".join(f"{k}={v}" for k, v in (meta.get("sampling") or {}).items())
    image_sha = f"sha256 {str(meta.get('image_tokenizer_sha256'))[:12]}..."
    image_tokenizer = (
        f"`{IMAGE_TOKENIZER_COPY}/`, included: a copy of `{meta.get('image_tokenizer')}` "
        f"({image_sha})" if folder_image_tokenizer_copy(Path(folder)) is not None else
        f"`{meta.get('image_tokenizer')}` ({image_sha}; not included: needed beside this "
        "folder to load it)")
    rows = [("family", family), ("documents", meta.get("documents", "caption")),
            ("training steps", meta.get("steps", "?")),
            ("started from", meta.get("init_from") or (
                f"the LLM `{meta['init_backbone']}` (backbone and text embeddings)"
                if meta.get("init_backbone") else "a random initialisation")),
            ("image size", f"{meta.get('image_size', '?')} px"),
            ("text tokenizer", f"`tokenizer.json`, a copy of `{meta.get('text_tokenizer')}` "
                               f"(vocabulary sha256 "
                               f"{str(meta.get('text_tokenizer_sha256'))[:12]}...)"),
            ("image tokenizer", image_tokenizer),
            ("sampling recipe", sampling or "SamplingConfig's defaults"),
            ("weights", f"`model.safetensors`, sha256 {str(meta.get('weights_sha256'))[:12]}...")]
    scores = meta.get("scores") or {}
    score_lines = ("\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in scores.items()) if scores else "")
    card = (f"---\nlibrary_name: fusion\ntags:\n- early-fusion\n- {family}\n"
            "- text-to-image\n- image-to-text\n---\n\n"
            f"# A fusion {family} model\n\n"
            "An early-fusion text-and-image model trained with fusion "
            "(`scripts/train.py`).\n\n| | |\n|---|---|\n"
            + "\n".join(f"| {k} | {v} |" for k, v in rows)
            + "\n\n## Use\n\n```python\nfrom fusion import FusionPipeline\n\n"
            f"pipe = FusionPipeline.from_pretrained(\"{folder}\")\n"
            "images = pipe(\"a photo of a red circle\", num_images=4, seed=0)\n```\n\n"
            "## Scores\n\n"
            + (f"| metric | value |\n|---|---|\n{score_lines}\n" if scores else
               "Not measured yet: `python scripts/evaluate.py model --model <this folder>` "
               "measures GenEval-shapes, FID-shapes and captioning.\n"))
    path = Path(folder) / "README.md"
    replace_atomically(path, lambda tmp: tmp.write_text(card))
    return path


# The keys load_model reads from a model folder's config.json.
MODEL_CONFIG_KEYS = ("model", "text_tokenizer", "image_tokenizer", "image_size")


def read_model_config(cfg_file: Path, error: type[UserError] = UserError) -> dict:
    """A model folder's ``config.json`` as a dict, refusing (``error``) invalid JSON."""
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{cfg_file} is not valid JSON ({err}); restore the file or re-save the "
                    "model with scripts/train.py") from err
    if not isinstance(meta, dict):
        raise error(f"{cfg_file} holds a JSON {type(meta).__name__}, not the object a model "
                    "folder's config.json is; restore the file or re-save the model")
    return meta


def check_weights(weights: Path, meta: dict, cfg_file: Path,
                  error: type[UserError] = UserError) -> None:
    """Refuse (``error``) a ``model.safetensors`` whose sha256 is not the one its config.json
    recorded: a truncated copy or a file from another run. Folders saved before the sha256
    was recorded have nothing to check."""
    recorded = meta.get("weights_sha256")
    if recorded and file_sha256(weights) != recorded:
        raise error(f"{weights} does not match the sha256 recorded in {cfg_file} (file corrupt "
                    "or replaced?); copy the model folder again, or re-save it with "
                    "scripts/train.py")


def check_text_tokenizer(meta: dict, tokenizer: TextTokenizer, cfg_file: Path,
                         where: str | Path | None = None) -> None:
    """Refuse a text tokenizer file (``where``: default the recorded path) whose vocabulary
    is not the one the model recorded: another tokenizer maps the model's ids to other words,
    silently."""
    recorded = meta.get("text_tokenizer_sha256")
    if not recorded:
        return
    found = text_tokenizer_fingerprint(tokenizer)
    if found != recorded:
        raise UserError(
            f"{cfg_file}: the model was trained with the text tokenizer {meta['text_tokenizer']}"
            f" (vocabulary sha256 {recorded[:12]}...), but "
            f"{'that path' if where is None else where} now holds a different "
            f"one ({tokenizer.vocab_size} tokens, sha256 {found[:12]}...); restore the "
            "original there, e.g. with `git show <commit>:<file>`")


def folder_text_tokenizer(folder: Path, meta: dict, cfg_file: Path) -> TextTokenizer:
    """The text tokenizer of a model folder: its own copy (``tokenizer.json``, what
    :func:`save_model` writes, so a published folder is complete), else the recorded path
    (folders saved before copies); checked against the recorded vocabulary either way."""
    copy = folder / TOKENIZER_COPY
    if copy.is_file():
        tokenizer = TextTokenizer.from_file(copy)
        check_text_tokenizer(meta, tokenizer, cfg_file, copy)
    else:
        tokenizer = TextTokenizer.from_file(resolve_path(meta["text_tokenizer"]))
        check_text_tokenizer(meta, tokenizer, cfg_file)
    return tokenizer


def folder_image_tokenizer(folder: Path, meta: dict, cfg_file: Path,
                           given: str | None = None) -> str:
    """Where a model folder's image tokenizer is read from (see :func:`load_model`), checked
    against the fingerprint ``config.json`` recorded: ``given``, else the folder's own copy,
    else the recorded path. A path that is not on disk is left to the loader to name."""
    recorded = meta.get("image_tokenizer_sha256")
    copy = None if given else folder_image_tokenizer_copy(folder)
    if copy is not None:
        if recorded and not image_tokenizer_matches(recorded, copy):
            raise UserError(
                f"{copy}, this model folder's copy of its image tokenizer "
                f"{meta['image_tokenizer']}, does not match the sha256 recorded in {cfg_file} "
                f"({recorded[:12]}...): the copy is damaged or was replaced; copy the model "
                "folder again, or pass a copy of the original artifact (scripts/evaluate.py "
                "--image-tokenizer PATH, FusionPipeline.from_pretrained(image_tokenizer=...))")
        return str(copy)
    image_path = given or meta["image_tokenizer"]
    if recorded and resolve_path(image_path).exists() and not image_tokenizer_matches(
            recorded, image_path):
        raise UserError(
            f"{cfg_file}: the model was trained with the image tokenizer {meta['image_tokenizer']}"
            f" (sha256 {recorded[:12]}...), but {image_path} holds a different artifact (a "
            "retrained one?); pass a copy of the original (scripts/evaluate.py "
            "--image-tokenizer PATH), e.g. restored with `git show <commit>:<file>`")
    return image_path


def load_model(path, image_tokenizer: str | None = None):
    """Inverse of :func:`save_model` -> (model, loss, text tokenizer, image tokenizer, meta).

    The image tokenizer is ``image_tokenizer`` when given, else the folder's own copy
    (``image_tokenizer/``), else (a folder saved before copies) the path ``config.json``
    recorded; whichever it is must be the artifact the model was trained with (its recorded
    fingerprint): another artifact would decode the model's latents or codes into wrong images
    without any error. The text tokenizer and the weights file are checked against their
    recorded fingerprints the same way."""
    from safetensors.torch import load_model as load_safetensors

    folder = Path(path)
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"model folder {folder} has no {f.name}")
    meta = read_model_config(cfg_file)
    missing = [k for k in MODEL_CONFIG_KEYS if k not in meta]
    if missing:
        raise UserError(f"{cfg_file} lacks the key(s) {', '.join(map(repr, missing))} that "
                        f"loading a model needs ({', '.join(MODEL_CONFIG_KEYS)}); point at a "
                        "model folder written by scripts/train.py, or add them")
    check_weights(weights, meta, cfg_file)
    tokenizer = folder_text_tokenizer(folder, meta, cfg_file)
    image_tokenizer = load_image_tokenizer(folder_image_tokenizer(folder, meta, cfg_file,
                                                                  image_tokenizer))
    model_cfg = OmegaConf.create(meta["model"])
    model, loss = build_family(model_cfg, tokenizer, image_tokenizer, meta["image_size"])
    try:
        load_safetensors(model, str(weights))
    except Exception as err:  # safetensors raises several types for corrupt/mismatched files
        raise UserError(f"{weights} does not match the model in {cfg_file}: {err}") from err
    return model, loss, tokenizer, image_tokenizer, meta
