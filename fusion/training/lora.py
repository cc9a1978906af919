"""LoRA fine-tuning of the shared transformer (``lora.rank > 0``; docs/pretrained.md).

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a pretrained weight W and trains a low-rank
update: y = W x + (α / r) · B A x, with A (r × in) random and B (out × r) zero at the start,
so the model starts as the pretrained one and only r · (in + out) numbers per matrix train.
The adapters come from Hugging Face ``peft`` (an optional extra, ``pip install
'fusion[lora]'``), injected into fusion's own modules in place, so the model keeps its class,
its family and its forward; only the targeted ``nn.Linear`` layers of the transformer blocks
become ``peft`` LoRA layers.

What trains: the adapters, plus whatever ``lora.train_also`` names in full (module-name
prefixes: the editing recipe's zero-initialised ``source_proj`` and ``copy_gate``, say).
Everything else is frozen, so the optimiser holds state for the adapters only.

A trained model is saved merged (W + (α / r) · B A written back into W, the LoRA layers
replaced by their base layers): the model folder is an ordinary one, which loads without
``peft`` and samples at the speed of the unadapted model.
"""

from __future__ import annotations

import logging

from torch import nn

from fusion.errors import UserError

log = logging.getLogger(__name__)

# The projections of a transformer block, by their names in fusion.models.transformer.
BLOCK_LINEARS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                 "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


def _peft():
    try:
        import peft
    except ImportError as err:
        raise UserError("lora.rank > 0 needs Hugging Face peft: pip install 'fusion[lora]' "
                        "(or pip install peft)") from err
    return peft


def target_pattern(targets) -> str:
    """The regex of the block projections named in ``targets`` (e.g. ["wq", "wv"])."""
    unknown = sorted(set(targets) - set(BLOCK_LINEARS))
    if unknown or not targets:
        raise UserError(f"lora.targets={list(targets)}: choose among {sorted(BLOCK_LINEARS)}")
    names = "|".join(f"{BLOCK_LINEARS[t]}\\.{t}" for t in sorted(set(targets)))
    return rf"(.*\.)?transformer\.layers\.\d+\.({names})"


def add_lora(model: nn.Module, cfg) -> nn.Module:
    """Inject LoRA adapters (``cfg``: rank, alpha, dropout, targets, train_also) into
    ``model`` in place and freeze everything but them and ``train_also``; returns ``model``.
    """
    peft = _peft()
    if cfg.rank <= 0:
        raise UserError(f"lora.rank must be positive to add adapters, got {cfg.rank}")
    config = peft.LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.alpha),
                             lora_dropout=float(cfg.dropout),
                             target_modules=target_pattern(cfg.targets))
    peft.inject_adapter_in_model(config, model)  # freezes every non-adapter parameter
    names = [n for n, _ in model.named_parameters()]
    for prefix in cfg.train_also:
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            raise UserError(f"lora.train_also: {prefix!r} names no parameter of this model "
                            f"(its top-level modules: {sorted({n.split('.')[0] for n in names})})")
    trained = dict(model.named_parameters())
    for name, param in trained.items():
        if any(name == p or name.startswith(p.rstrip(".") + ".") for p in cfg.train_also):
            param.requires_grad_(True)
    n_train = sum(p.numel() for p in trained.values() if p.requires_grad)
    n_all = sum(p.numel() for p in trained.values())
    log.info("LoRA rank %d on %s: %d of %d parameters train (%.2f %%)", cfg.rank,
             sorted(set(cfg.targets)), n_train, n_all, 100 * n_train / max(n_all, 1))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Write every adapter into its base weight and put the base layer back in place of the
    LoRA layer (in place); returns ``model``, whose state dict is then the plain model's."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for param in model.parameters():
        param.requires_grad_(True)
    return model
