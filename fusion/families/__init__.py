"""Families: the registry of recipes and what every entry point asks of it.

``build_family`` turns a model config into (model, loss), ``family_sampler`` gives the sampler
of a built model, and ``load_image_tokenizer`` reads a stage-1 artifact; all three go through
the registry (:mod:`fusion.families.registry`), so no caller names a family. The built-in
families register themselves when this package is imported.
"""

from __future__ import annotations

from fusion.config import resolve_path
from fusion.data.text import TextTokenizer
from fusion.errors import UserError
from fusion.families.registry import (
    KIND_NAMES,
    KIND_OUTPUTS,
    Family,
    family_of,
    family_of_weights,
    get,
    names,
    register,
)


def load_image_tokenizer(path: str):
    """A stage-1 artifact folder -> ``VQTokenizer`` (``"kind": "vqgan"`` in its config.json)
    or ``VAETokenizer`` (anything else the VAE reads).

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


def image_tokenizer_kind(image_tokenizer) -> str:
    """``"vqgan"`` for a tokenizer of discrete codes (it has a codebook), else ``"vae"``."""
    return "vqgan" if hasattr(image_tokenizer, "codebook_size") else "vae"


def check_image_tokenizer(family: Family, image_tokenizer) -> None:
    """Refuse an image tokenizer of another kind than ``family`` reads, naming both and the
    artifact to pass instead: a VAE in Chameleon or a VQ-GAN in Transfusion otherwise fails
    deep inside the model with a message about shapes or missing attributes."""
    need, have = family.image_tokenizer_kind, image_tokenizer_kind(image_tokenizer)
    if need == have:
        return
    path = getattr(image_tokenizer, "artifact_path", None)
    given = f"image_tokenizer={path}" if path else "the image tokenizer given"
    raise UserError(f"the {family.name} family needs a {KIND_NAMES[need]} image tokenizer "
                    f"({KIND_OUTPUTS[need]}), but {given} is a {KIND_NAMES[have]}; pass "
                    f"image_tokenizer={family.default_image_tokenizer} (or another "
                    f"{KIND_NAMES[need]} artifact)")


def build_family(model_cfg, tokenizer: TextTokenizer, image_tokenizer, image_size: int):
    """(model ``nn.Module``, loss callable) of ``model_cfg.family`` (registry.Family.build)."""
    family = get(model_cfg.family)
    check_image_tokenizer(family, image_tokenizer)
    return family.build(model_cfg, tokenizer, image_tokenizer, image_size)


def family_sampler(model, loss, tokenizer: TextTokenizer, image_tokenizer,
                   use_cache: bool = True):
    """The sampler of ``model``'s family (fusion.sampling.base.FamilySampler)."""
    return family_of(model).sampler(model, loss, tokenizer, image_tokenizer, use_cache)


# The built-in families (each registers itself); after the functions above, which they use.
from fusion.families import transfusion as _transfusion  # noqa: E402, F401, I001
from fusion.families import chameleon as _chameleon  # noqa: E402, F401

__all__ = ["Family", "build_family", "check_image_tokenizer", "family_of", "family_of_weights",
           "family_sampler", "get", "image_tokenizer_kind", "load_image_tokenizer", "names",
           "register"]
