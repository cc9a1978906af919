"""Config -> (model, loss, frozen image tokenizer) for each family; saving, loading and
fine-tuning initialisation (``init_from``) of family models. Scripts call this."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusion.config import resolve_path
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.io import replace_atomically

log = logging.getLogger(__name__)

FAMILIES = ("transfusion", "chameleon")


def to_dataclass(node, cls):
    """A config node (typed DictConfig, plain dict, or already ``cls``) as an instance of its
    schema dataclass, nested fields included; unknown keys fail, naming the key."""
    if isinstance(node, cls):
        return node
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))


def load_image_tokenizer(path: str):
    """A stage-1 artifact folder -> ``VQTokenizer`` (``"kind": "vqgan"`` in its config.json,
    Chameleon) or ``VAETokenizer`` (anything else the VAE reads, Transfusion).

    The tokenizer keeps ``path`` as ``artifact_path``, so that :func:`build_family` can name
    the artifact when it does not suit the family."""
    from fusion.image.artifacts import artifact_kind

    given, path = str(path), resolve_path(path)
    if artifact_kind(path) == "vqgan":
        from fusion.image.vqgan import VQTokenizer

        tokenizer = VQTokenizer.from_pretrained(path)
    else:
        from fusion.image.vae import VAETokenizer

        tokenizer = VAETokenizer.from_pretrained(path)
    tokenizer.artifact_path = given
    return tokenizer


# The image tokenizer kind each family reads, and the shipped artifact of each kind.
FAMILY_IMAGE_TOKENIZER = {"transfusion": "vae", "chameleon": "vqgan"}
SHIPPED_IMAGE_TOKENIZER = {"vae": "tokenizers/shapes-vae", "vqgan": "tokenizers/shapes-vqgan"}
KIND_NAMES = {"vae": "VAE", "vqgan": "VQ-GAN"}
KIND_OUTPUTS = {"vae": "continuous latents", "vqgan": "discrete codes"}


def image_tokenizer_kind(image_tokenizer) -> str:
    """``"vqgan"`` for a tokenizer of discrete codes (it has a codebook), else ``"vae"``."""
    return "vqgan" if hasattr(image_tokenizer, "codebook_size") else "vae"


def check_image_tokenizer(family: str, image_tokenizer) -> None:
    """Refuse an image tokenizer of the kind the other family reads, naming both and the
    artifact to pass instead: a VAE in Chameleon or a VQ-GAN in Transfusion otherwise fails
    deep inside the model with a message about shapes or missing attributes."""
    need, have = FAMILY_IMAGE_TOKENIZER[family], image_tokenizer_kind(image_tokenizer)
    if need == have:
        return
    path = getattr(image_tokenizer, "artifact_path", None)
    given = f"image_tokenizer={path}" if path else "the image tokenizer given"
    raise UserError(f"the {family} family needs a {KIND_NAMES[need]} image tokenizer "
                    f"({KIND_OUTPUTS[need]}), but {given} is a {KIND_NAMES[have]}; pass "
                    f"image_tokenizer={SHIPPED_IMAGE_TOKENIZER[need]} (or another "
                    f"{KIND_NAMES[need]} artifact)")


def build_family(model_cfg, tokenizer: TextTokenizer, image_tokenizer, image_size: int):
    """Returns (model nn.Module, loss callable)."""
    from fusion.models.packing import row_length

    family = model_cfg.family
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    check_image_tokenizer(family, image_tokenizer)
    if family == "transfusion":
        from fusion.models.schemas import TransfusionModelConfig
        from fusion.models.transfusion import SpecialIds, Transfusion, TransfusionLoss

        cfg = to_dataclass(model_cfg, TransfusionModelConfig)
        arch = cfg.arch
        grid = image_size // image_tokenizer.downsample_factor
        for name, value in (("latent_channels", image_tokenizer.latent_channels),
                            ("latent_size", grid)):
            given = getattr(arch, name)
            if given is not None and given != value:
                raise UserError(f"model.arch.{name}={given} but the image tokenizer gives "
                                 f"{value}; leave it unset (null) to take the tokenizer's")
        arch = dataclasses.replace(arch, latent_channels=image_tokenizer.latent_channels,
                                   latent_size=grid)
        model = Transfusion(arch, tokenizer.vocab_size)
        row_length(cfg.loss.pack_len, model.max_seq_len)  # a bad pack_len fails before training
        return model, TransfusionLoss(cfg.loss, SpecialIds.from_tokenizer(tokenizer))
    if family == "chameleon":
        from fusion.models.chameleon import Chameleon, ChameleonLoss
        from fusion.models.cm3 import CM3Tokens
        from fusion.models.schemas import ChameleonModelConfig
        from fusion.models.transfusion import SpecialIds

        cfg = to_dataclass(model_cfg, ChameleonModelConfig)
        h, w = image_tokenizer.latent_grid(image_size)
        model = Chameleon(cfg.arch, tokenizer.vocab_size, image_tokenizer.codebook_size, h * w,
                          code_grid=(h, w))
        row_length(cfg.loss.pack_len, model.max_seq_len)
        cm3 = CM3Tokens(tuple(tokenizer.sentinel_ids()), tokenizer.eoss_id)
        return model, ChameleonLoss(cfg.loss, SpecialIds.from_tokenizer(tokenizer), cm3)
    raise AssertionError(family)  # FAMILIES is checked above


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


RECIPE_SAMPLING_KEYS = ("guidance_scale", "image_guidance_scale", "diffusion_steps", "temperature",
                        "top_k", "top_p")


def recipe_sampling(sampling_cfg) -> dict:
    """The sampling settings a run was configured with, recorded in the model's config.json
    so that scripts/evaluate.py samples the model the way its recipe says by default."""
    return {k: sampling_cfg[k] for k in RECIPE_SAMPLING_KEYS if k in sampling_cfg}


def recorded_sampling(meta: dict) -> dict:
    """The sampling settings a model folder's config.json recorded from its recipe, with
    SamplingConfig's defaults for any it lacks (folders saved before models recorded them):
    what scripts/evaluate.py and the main job sample with unless told otherwise."""
    from fusion.config import SamplingConfig

    recorded, fallback = meta.get("sampling") or {}, SamplingConfig()
    return {k: recorded.get(k, getattr(fallback, k)) for k in RECIPE_SAMPLING_KEYS}


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def save_model(out_dir, model, model_cfg, tokenizer_path: str, image_tokenizer_path: str,
               extra: dict | None = None):
    """A trained family model as ``config.json`` + ``model.safetensors`` (no pickle).

    ``config.json`` also holds fingerprints of both tokenizers, which ``init_from`` checks,
    and the sha256 of ``model.safetensors`` (``weights_sha256``), which loading checks.
    config.json is removed first and written last, each file through a temporary one, so a
    crash while saving leaves a folder that refuses to load rather than a config that
    describes weights it does not hold."""
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
    cfg_file.unlink(missing_ok=True)
    replace_atomically(weights, lambda tmp: save_safetensors(model, str(tmp)))
    meta["weights_sha256"] = file_sha256(weights)
    replace_atomically(cfg_file, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return out


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


def check_text_tokenizer(meta: dict, tokenizer: TextTokenizer, cfg_file: Path) -> None:
    """Refuse a text tokenizer file whose vocabulary is not the one the model recorded: a
    retrained tokenizer at the same path maps the model's ids to other words, silently."""
    recorded = meta.get("text_tokenizer_sha256")
    if not recorded:
        return
    found = text_tokenizer_fingerprint(tokenizer)
    if found != recorded:
        raise UserError(
            f"{cfg_file}: the model was trained with the text tokenizer {meta['text_tokenizer']}"
            f" (vocabulary sha256 {recorded[:12]}...), but that path now holds a different "
            f"one ({tokenizer.vocab_size} tokens, sha256 {found[:12]}...); restore the "
            "original there, e.g. with `git show <commit>:<file>`")


def load_model(path, image_tokenizer: str | None = None):
    """Inverse of :func:`save_model` -> (model, loss, text tokenizer, image tokenizer, meta).

    The image tokenizer is the one recorded in ``config.json`` unless ``image_tokenizer`` names
    another copy; either way it must be the artifact the model was trained with (its recorded
    fingerprint): a retrained artifact at the same path would decode the model's latents or
    codes into wrong images without any error. The text tokenizer and the weights file are
    checked against their recorded fingerprints the same way."""
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
    tokenizer = TextTokenizer.from_file(resolve_path(meta["text_tokenizer"]))
    check_text_tokenizer(meta, tokenizer, cfg_file)
    image_path = image_tokenizer or meta["image_tokenizer"]
    recorded = meta.get("image_tokenizer_sha256")
    if recorded and resolve_path(image_path).exists() and not image_tokenizer_matches(
            recorded, image_path):
        raise UserError(
            f"{cfg_file}: the model was trained with the image tokenizer {meta['image_tokenizer']}"
            f" (sha256 {recorded[:12]}...), but {image_path} holds a different artifact (a "
            "retrained one?); pass a copy of the original (scripts/evaluate.py "
            "--image-tokenizer PATH), e.g. restored with `git show <commit>:<file>`")
    image_tokenizer = load_image_tokenizer(image_path)
    model_cfg = OmegaConf.create(meta["model"])
    model, loss = build_family(model_cfg, tokenizer, image_tokenizer, meta["image_size"])
    try:
        load_safetensors(model, str(weights))
    except Exception as err:  # safetensors raises several types for corrupt/mismatched files
        raise UserError(f"{weights} does not match the model in {cfg_file}: {err}") from err
    return model, loss, tokenizer, image_tokenizer, meta


# --------------------------------------------------------------------------------------------
# Fine-tuning: init_from
# --------------------------------------------------------------------------------------------
class InitFromError(UserError):
    """``init_from`` weights do not fit the run; the message lists every difference found."""


def read_init_weights(path) -> tuple[dict, dict | None]:
    """(state dict, the saved ``config.json`` or None) from a model folder, a
    ``model.safetensors`` file, or a Lightning ``.ckpt`` (its EMA weights when it has them,
    like the saved model folder).

    Nothing is unpickled (docs/design.md, Principles): safetensors, or ``torch.load`` with
    ``weights_only=True``. A ``.ckpt`` is matched with ``<run>/model/config.json`` when
    that exists next to its ``<run>/checkpoints/`` folder."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = resolve_path(path)

    def weights_at(file: Path) -> dict:
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise InitFromError(f"init_from={path}: {file} is corrupt or not a safetensors "
                                f"file ({err})") from err

    def meta_at(cfg_file: Path) -> dict | None:
        if not cfg_file.is_file():
            return None
        return read_model_config(cfg_file, InitFromError)

    def checked(weights: Path, meta: dict | None) -> tuple[dict, dict | None]:
        """The weights of a model folder, verified against its recorded sha256 (after
        reading them, so a file that is no safetensors at all is reported as such)."""
        state = weights_at(weights)
        if meta is not None and weights.name == "model.safetensors":
            check_weights(weights, meta, weights.parent / "config.json", InitFromError)
        return state, meta

    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file() or not (p / "config.json").is_file():
            raise InitFromError(f"init_from={path}: a model folder needs config.json and "
                                "model.safetensors (what scripts/train.py writes to "
                                "<output_dir>/model)")
        return checked(weights, meta_at(p / "config.json"))
    if not p.is_file():
        raise InitFromError(f"init_from={path}: no such file or folder")
    if p.suffix == ".safetensors":
        return checked(p, meta_at(p.parent / "config.json"))
    if p.suffix == ".ckpt":
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle refuses non-tensor objects under weights_only
            raise InitFromError(f"init_from={path}: not a loadable Lightning checkpoint with "
                                f"weights_only=True: {err}") from err
        sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise InitFromError(f"init_from={path}: no 'state_dict' in this checkpoint")
        prefix = "ema.module." if any(k.startswith("ema.module.") for k in sd) else "model."
        state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return state, meta_at(p.parent.parent / "model" / "config.json")
    raise InitFromError(f"init_from={path}: expected a model folder (config.json + "
                        "model.safetensors), a .safetensors file or a Lightning .ckpt")


def _first_difference(a: list[str], b: list[str]) -> str:
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return f"first at id {i}: {a[i]!r} vs {b[i]!r}"


def _text_differences(meta: dict, tokenizer: TextTokenizer, run_path: str) -> list[str]:
    saved_path = meta.get("text_tokenizer")
    fix = f"set data.text_tokenizer={saved_path}" if saved_path else "use the same text tokenizer"
    ours = text_vocabulary(tokenizer)
    saved = None
    if saved_path and resolve_path(saved_path).exists():
        saved = text_vocabulary(TextTokenizer.from_file(resolve_path(saved_path)))
    elif meta.get("text_tokenizer_sha256"):
        if meta["text_tokenizer_sha256"] == text_tokenizer_fingerprint(tokenizer):
            return []
        return [f"text tokenizer: the checkpoint's ({saved_path}, no longer on disk) has "
                f"different tokens from this run's ({run_path}); {fix}"]
    if saved is None:
        log.warning("init_from: cannot compare text tokenizers (%s is not on disk); checking "
                    "vocabulary size only", saved_path)
        return []
    if len(saved) != len(ours):
        return [f"text vocabulary: the checkpoint's tokenizer ({saved_path}) has {len(saved)} "
                f"tokens, this run's ({run_path}) has {len(ours)}; {fix}"]
    if saved != ours:
        return [f"text tokenizer: same size ({len(ours)}) but different tokens "
                f"({_first_difference(saved, ours)}) between {saved_path} and {run_path}; {fix}"]
    return []


def _image_differences(meta: dict, run_path: str, image_size: int) -> list[str]:
    out = []
    saved_path = meta.get("image_tokenizer")
    same_path = saved_path and resolve_path(saved_path).resolve() == resolve_path(
        run_path).resolve()
    # Compared even at the same path: a retrained artifact there is a different tokenizer.
    saved = meta.get("image_tokenizer_sha256") or (
        None if same_path or not saved_path else image_tokenizer_fingerprint(saved_path))
    if saved_path and saved is None and not same_path:
        log.warning("init_from: cannot compare image tokenizers (%s is not on disk)",
                    saved_path)
    elif saved is not None and not image_tokenizer_matches(saved, run_path):
        out.append(f"image tokenizer: the checkpoint was trained with a different artifact at "
                   f"{saved_path}, which its files no longer match; restore it or point "
                   f"image_tokenizer= at a copy" if same_path else
                   f"image tokenizer: the checkpoint was trained with {saved_path}, this "
                   f"run uses {run_path} (different files); set image_tokenizer={saved_path}")
    if meta.get("image_size") not in (None, image_size):
        out.append(f"image size: the checkpoint was trained at {meta['image_size']} px, this "
                   f"run uses data.image_size={image_size}")
    return out


# Weights a fine-tune may add to its start model, initialised to zero (Chameleon's
# source_alignment projection, which leaves the start model's function unchanged, and its
# source_copy gate, which only acts on editing targets).
STARTS_AT_ZERO = ("source_proj.", "copy_gate.")


def _weight_differences(model, state: dict) -> list[str]:
    own = model.state_dict()
    # Tied weights are stored once (safetensors drops duplicates): a key missing from the file
    # is fine when a tensor it shares storage with is there.
    aliases: dict[int, list[str]] = {}
    for k, v in own.items():
        aliases.setdefault(v.data_ptr(), []).append(k)
    missing = [k for k, v in own.items()
               if k not in state and not any(a in state for a in aliases[v.data_ptr()])
               and not k.startswith(STARTS_AT_ZERO)]
    unexpected = [k for k in state if k not in own]
    differ = [k for k in own if k in state and state[k].shape != own[k].shape]
    out = []
    vocab = ("embed.weight", "lm_head.weight")
    if "embed.weight" in differ and state["embed.weight"].shape[0] != own["embed.weight"].shape[0]:
        # Chameleon's vocabulary is the text vocabulary + the VQ-GAN's codebook
        out.append(f"vocabulary size: the checkpoint has {state['embed.weight'].shape[0]} ids, "
                   f"this model {own['embed.weight'].shape[0]}")
        differ = [k for k in differ if k not in vocab]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, this model {tuple(own[k].shape)}"
              for k in differ]
    if shapes:
        out.append(f"weight shapes: {len(shapes)} tensor(s) differ (" + "; ".join(shapes[:4])
                   + (" ..." if len(shapes) > 4 else "") + ")")
    if missing:
        out.append(f"{len(missing)} weight(s) missing from the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        out.append(f"{len(unexpected)} weight(s) in the checkpoint that this model lacks "
                   f"(e.g. {unexpected[:3]})")
    return out


def _arch_differences(saved: dict, ours: dict, where: str = "model.arch.") -> list[str]:
    """Config values that differ, as ``key: checkpoint X, this run Y`` (unset = default)."""
    out = []
    for k in sorted(set(saved) | set(ours)):
        a, b = saved.get(k), ours.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _arch_differences(a, b, f"{where}{k}.")
        elif a != b:
            show = [repr(v) if k in d else "unset" for v, d in ((a, saved), (b, ours))]
            out.append(f"{where}{k}: checkpoint {show[0]}, this run {show[1]}")
    return out


def init_from_checkpoint(model, cfg, tokenizer: TextTokenizer) -> dict:
    """Load ``cfg.init_from`` into ``model`` (a fresh ``build_family`` model of run ``cfg``)
    for fine-tuning; returns the checkpoint's saved config (``{}`` when it has none).

    Before touching the weights, checks that the checkpoint fits this run -- same family, same
    text tokenizer and vocabulary, same image tokenizer and image size, same weight names and
    shapes -- and raises :class:`InitFromError` listing everything that differs and how to
    fix it (a checkpoint from the other family, or trained with another tokenizer, would
    otherwise load garbage or fail deep inside torch)."""
    path = cfg.init_from
    state, meta = read_init_weights(path)
    family = cfg.model.family
    diffs = []
    if meta is not None:
        saved_family = (meta.get("model") or {}).get("family")
        if saved_family != family:
            diffs.append(f"family: the checkpoint is a {saved_family!r} model, this run "
                         f"trains {family!r} (pick the matching experiment, e.g. "
                         f"experiment=edit_{saved_family}_tiny)")
        diffs += _text_differences(meta, tokenizer, cfg.data.text_tokenizer)
        diffs += _image_differences(meta, cfg.image_tokenizer, cfg.data.image_size)
    else:
        log.warning("init_from=%s has no config.json beside it: checking family and weight "
                    "shapes only", path)
        saved_family = "transfusion" if any(k.startswith("patchifier.") for k in state) \
            else "chameleon"
        if saved_family != family:
            diffs.append(f"family: the checkpoint's weights are a {saved_family!r} model's, "
                         f"this run trains {family!r}")
    if saved_family == family:  # the other family's weights differ everywhere: say it once
        weights = _weight_differences(model, state)
        if weights and meta is not None:
            ours = OmegaConf.to_container(cfg.model.arch, resolve=True)
            weights += _arch_differences((meta.get("model") or {}).get("arch") or {}, ours)
        diffs += weights
    if diffs:
        raise InitFromError(f"init_from={path} does not fit this run:\n  - "
                            + "\n  - ".join(diffs))
    saved_loss = ((meta or {}).get("model") or {}).get("loss") or {}
    if "diffusion" in saved_loss:  # another objective (ddpm -> flow) loads but starts over
        ours = OmegaConf.to_container(cfg.model.loss.diffusion, resolve=True)
        sampling_only = ("sample_steps", "guidance_interval")  # how to sample, not to train
        saved = {k: v for k, v in saved_loss["diffusion"].items() if k not in sampling_only}
        ours = {k: v for k, v in ours.items() if k not in sampling_only}
        for d in _arch_differences(saved, ours, "model.loss.diffusion."):
            log.warning("init_from: %s", d)
    model.load_state_dict(state, strict=False)  # completeness was checked above
    log.info("initialised %s weights from %s", family, path)
    return meta or {}
