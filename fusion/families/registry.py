"""What a family is: one :class:`Family` spec per recipe, in one registry.

A family binds a model class, its config schema, how to build the model and its loss from a
config, the sampler that generates with it, and the kind of image tokenizer it reads. Everything
that is the same for every family (training, model folders, ``init_from``, sampling scripts,
evaluation, the main job) asks the registry instead of testing for a family by name, so a new
family is one module that calls :func:`register` plus its configs (docs/design.md, "Families").

Contracts (both built-in families meet them, tests/test_families.py checks a third):

* ``build(model_cfg, text_tokenizer, image_tokenizer, image_size) -> (model, loss)``:
  ``model`` is a plain ``nn.Module`` with ``vocab_size`` and ``max_seq_len``; ``loss`` is
  callable as ``loss(model, documents, encode, rng, generator=None) -> {"loss": ..., parts}``
  and has ``text_budget(model, n_images) -> int`` (text tokens a document with that many images
  can hold in one packed row). Optional: a loss with ``preparer(model)`` (a picklable
  ``(documents, rng) -> PreparedBatch``, fusion.models.packing) and ``compute(model, batch,
  encode, generator)`` gets its batches prepared in the loader workers (packing, dropout and
  CM3 draws), so the training process only encodes, draws noise and runs the model. A model
  whose shared network is ``model.transformer``
  (fusion.models.transformer.Transformer) with a loss that packs rows of ``loss.cfg.pack_len``
  and returns ``positions`` (packed positions that are not padding) gets its training FLOPs
  counted (:func:`training_flops_per_position`), and can take ``optim.flops_budget``. A model
  with ``text_logits(ids, layout) -> (B, S, V)`` for text-only packed batches gets the held-out
  text loss (fusion.eval.text_loss).
* ``sampler(model, loss, text_tokenizer, image_tokenizer, use_cache) ->`` an object with
  ``generate_images``, ``caption``, ``generate_text``, ``edit`` and ``prompt_budget``
  (fusion.sampling.base.FamilySampler).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fusion.errors import UserError

# Image tokenizer kinds: what a family reads from stage 1.
KIND_NAMES = {"vae": "VAE", "vqgan": "VQ-GAN"}
KIND_OUTPUTS = {"vae": "continuous latents", "vqgan": "discrete codes"}


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    schema: type  # the model config dataclass that model/<family>_*.yaml fill
    image_tokenizer_kind: str  # "vae" | "vqgan"
    default_image_tokenizer: str  # the shipped artifact of that kind, named in errors
    build: Callable  # (model_cfg, text_tokenizer, image_tokenizer, image_size) -> (model, loss)
    sampler: Callable  # (model, loss, text_tokenizer, image_tokenizer, use_cache) -> sampler
    # State-dict key prefixes only this family's models have: recognises bare weights (a
    # .ckpt or .safetensors without config.json) passed to init_from.
    weight_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.image_tokenizer_kind not in KIND_NAMES:
            raise ValueError(f"family {self.name!r}: image_tokenizer_kind must be one of "
                             f"{tuple(KIND_NAMES)}, got {self.image_tokenizer_kind!r}")


def sampler_io(tokenizer, image_tokenizer, use_cache: bool = True) -> dict:
    """The keyword arguments every family's sampler takes: the text tokenizer's special ids,
    the frozen image tokenizer's ``decode`` / ``encode`` (None for both without one: images
    stay latents or codes), and whether to use the KV cache."""
    from fusion.models.packing import SpecialIds

    codec = image_tokenizer is not None
    return dict(special=SpecialIds.from_tokenizer(tokenizer),
                decode_images=image_tokenizer.decode if codec else None,
                encode_images=image_tokenizer.encode if codec else None, use_cache=use_cache)


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (again under the same name replaces it), and its config
    schema to Hydra's ConfigStore as ``model/<name>_schema`` for its YAML files."""
    from hydra.core.config_store import ConfigStore

    _FAMILIES[family.name] = family
    ConfigStore.instance().store(group="model", name=f"{family.name}_schema",
                                 node=family.schema)
    return family


def names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def get(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown model family {name!r}; expected one of {names()}") from None


def family_of(model) -> Family:
    """The family whose model class ``model`` is (its exact class first, so a family whose
    model subclasses another family's is still told apart)."""
    for family in _FAMILIES.values():
        if type(model) is family.model_class:
            return family
    for family in _FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"{type(model).__name__} is not the model of a registered family "
                    f"({', '.join(names())})")


def family_of_weights(keys) -> Family | None:
    """The family whose ``weight_prefixes`` appear among state-dict ``keys`` (None: unknown)."""
    keys = list(keys)
    for family in _FAMILIES.values():
        if family.weight_prefixes and any(k.startswith(family.weight_prefixes) for k in keys):
            return family
    return None


def training_flops_per_position(model, loss) -> float:
    """Training FLOPs per packed position of a family model, or 0.0 for a family that does not
    meet the optional FLOP contract above (its FLOPs are then not counted)."""
    from fusion.models.packing import row_length
    from fusion.models.transformer import Transformer
    from fusion.models.transformer import training_flops_per_position as per_row

    pack_len = getattr(getattr(loss, "cfg", None), "pack_len", False)
    if not isinstance(getattr(model, "transformer", None), Transformer) or pack_len is False:
        return 0.0
    return per_row(model, row_length(pack_len, model.max_seq_len))
