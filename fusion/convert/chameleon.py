"""A Hugging Face Chameleon / Anole folder as a fusion Chameleon-family model folder.

``python scripts/convert.py chameleon --hf <folder> --out <model folder>
[--vqgan <vqgan.ckpt> --vqgan-config <vqgan.yaml>]`` reads a local
``ChameleonForConditionalGeneration`` folder (Meta's Chameleon-7B/30B as converted by
transformers, or Anole, which keeps that layout) and writes what ``scripts/train.py
init_from=``, ``scripts/sample.py`` and ``FusionPipeline`` load.

What moves where (docs/pretrained.md):

* The backbone is a Llama with Chameleon's per-head QK-norm (and swin-norm in the 30B), the
  blocks of ``fusion.convert.llama`` with ``qk_norm`` (and ``norm_reorder``) on.
* Vocabulary. Chameleon keeps its 8,192 image codes inside the 65,536-token text vocabulary as
  BPE tokens named ``IMGIMG<code in letters>Z``; fusion puts codes after the text vocabulary
  (id = text_vocab + code). Every embedding and LM-head row moves with its token: the row of
  code c is the checkpoint's row of c's IMGIMG token. The IMGIMG ids stay in the text
  tokenizer (fusion uses Chameleon's tokenizer unchanged, so every other id is the same) and
  are recorded as ``unused_text_ranges``, never generated as text, as Meta's model suppresses
  them in text (transformers sets their logits to the dtype's minimum).
* Special tokens. Chameleon's image span is ``<racm3:break> codes <eoss>`` and a document
  starts with its ``bos_token_id``; fusion's ``<boi>``/``<eoi>``/``<bos>``/``<eos>`` get those
  tokens' rows, so the converted model computes what Chameleon computes on the same document.
  Those four Chameleon tokens are renamed ``<retired:...>`` (:func:`retire_aliased_tokens`):
  CM3's ``<eoss>`` gets an id of its own instead of Chameleon's end of an image, and the
  retired ids, which tie with their replacements, are never generated. fusion's other special
  tokens are appended after the vocabulary with the mean row
  (``fusion.convert.llama.gather_rows``).
* The VQ-GAN. The Hugging Face folder holds the encoder and codebook only (``model.vqmodel``):
  converted alone, the image tokenizer encodes like Chameleon's but its decoder is untrained.
  Meta's original release (and Anole's) ships the whole taming-transformers VQ-GAN; pass it
  as ``--vqgan``/``--vqgan-config`` and the decoder comes from there (fusion.convert.taming).

Shape legend: V_hf = Chameleon's vocabulary (65,536), K = codebook size (8,192),
V = fusion's vocabulary = text_vocab + K.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer

from fusion.convert.llama import (
    CheckpointError,
    HFCheckpoint,
    added_special_ids,
    backbone_differences,
    backbone_overrides,
    expected_backbone,
    gather_rows,
    text_row_sources,
    transformer_state,
    unsupported_features,
)
from fusion.data.text import BOI, BOS, EOI, EOS, PAD, TextTokenizer
from fusion.models.chameleon import Chameleon
from fusion.models.schemas import ChameleonConfig, ChameleonModelConfig
from fusion.models.transformer import TRANSFORMER_PRESETS, transformer_config

log = logging.getLogger(__name__)

BOI_TOKEN, EOI_TOKEN = "<racm3:break>", "<eoss>"  # Chameleon's image span


@dataclasses.dataclass
class ChameleonLayout:
    """Where fusion's ids come from in a Chameleon checkpoint."""

    model_cfg: ChameleonModelConfig
    tokenizer: TextTokenizer
    codes: dict[int, int]  # Chameleon BPE id -> code
    row_source: list[int]  # fusion id -> Chameleon row, -1 = the mean row
    image_size: int
    codes_per_image: int


def chameleon_layout(ckpt: HFCheckpoint) -> ChameleonLayout:
    """Check that the checkpoint is a Chameleon fusion can hold and map its vocabulary;
    raises :class:`CheckpointError` naming every problem."""
    cfg, where = ckpt.config, f"{ckpt.option}={ckpt.folder}"
    if cfg.get("model_type") != "chameleon":
        raise CheckpointError(f"{where}: model_type {cfg.get('model_type')!r}; a Hugging Face "
                              "Chameleon folder (ChameleonForConditionalGeneration) has "
                              "'chameleon'")
    problems = unsupported_features(cfg, where)
    vq = cfg.get("vq_config") or {}
    if not (ckpt.folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{where}: no tokenizer.json")
    own = Tokenizer.from_file(str(ckpt.folder / "tokenizer.json"))
    # Chameleon's own tokens keep their ids; the ones fusion appends take these ids' rows.
    aliases = {BOS: cfg.get("bos_token_id"), EOS: cfg.get("eos_token_id"),
               PAD: cfg.get("pad_token_id"), BOI: own.token_to_id(BOI_TOKEN),
               EOI: own.token_to_id(EOI_TOKEN)}
    own = retire_aliased_tokens(own, aliases)
    tokenizer = TextTokenizer(Tokenizer.from_str(own.to_str()))  # + fusion's special tokens
    codes = tokenizer.chameleon_image_tokens()
    n_codes = int(vq.get("num_embeddings", 0))
    if not codes:
        problems.append(f"{where}: its tokenizer has no IMGIMG image tokens")
    elif sorted(codes.values()) != list(range(n_codes)):
        problems.append(f"{where}: {len(codes)} IMGIMG tokens do not name the codes "
                        f"0..{n_codes - 1} of vq_config.num_embeddings={n_codes}")
    for fusion_name, name in ((BOI, BOI_TOKEN), (EOI, EOI_TOKEN)):
        if aliases[fusion_name] is None:
            problems.append(f"{where}: the vocabulary has no {name} (Chameleon's image span)")
    if problems:
        raise CheckpointError("cannot convert this checkpoint:\n  - " + "\n  - ".join(problems))

    n_rows = int(cfg["vocab_size"])
    appended = added_special_ids(ckpt.folder, tokenizer, own)  # not Chameleon's own tokens
    source = text_row_sources(tokenizer, n_rows, appended, aliases)
    img2bpe = {code: bpe for bpe, code in codes.items()}
    source += [img2bpe[c] for c in range(n_codes)]

    resolution = int(vq.get("resolution", 512))
    factor = 2 ** (len(vq.get("channel_multiplier", (1, 1, 2, 2, 4))) - 1)
    preset, expected = chameleon_backbone(cfg)
    arch = ChameleonConfig(backbone=preset, backbone_overrides=backbone_overrides(
        expected, TRANSFORMER_PRESETS[preset]))
    if cfg.get("max_position_embeddings") != transformer_config(
            preset, **arch.backbone_overrides).max_seq_len:
        arch.backbone_overrides["max_seq_len"] = int(cfg["max_position_embeddings"])
    model_cfg = ChameleonModelConfig(arch=arch)
    return ChameleonLayout(model_cfg, tokenizer, codes, source, resolution,
                           (resolution // factor) ** 2)


def retire_aliased_tokens(own: Tokenizer, aliases: dict[str, int | None]) -> Tokenizer:
    """Chameleon's tokenizer with each token whose part (and row) one of fusion's special
    tokens takes renamed ``<retired:NAME>``, every id unchanged: ``<s>``, ``</s>``,
    ``<racm3:break>`` and ``<eoss>`` (fusion's ``<pad>`` is Chameleon's own). The rename
    frees ``<eoss>``, Chameleon's end of an image, for fusion's end of a CM3 span, which then
    gets an id of its own; and it marks the retired ids never generated
    (:meth:`TextTokenizer.never_generated_ids`), since each ties with its replacement in
    every logit. The post-processor, which names ``<s>`` and which fusion never applies
    (fusion places its own ``<bos>``), is dropped."""
    spec = json.loads(own.to_str())
    renamed = {}
    for fusion_name, i in aliases.items():
        name = own.id_to_token(i) if isinstance(i, int) else None
        if name is not None and name != fusion_name:
            renamed[name] = f"<retired:{name}>"
    for token in spec.get("added_tokens") or []:
        token["content"] = renamed.get(token["content"], token["content"])
    vocab = (spec.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for name, new in renamed.items():
            if name in vocab:
                vocab[new] = vocab.pop(name)
    spec["post_processor"] = None
    return Tokenizer.from_str(json.dumps(spec))


def chameleon_backbone(cfg: dict) -> tuple[str, dict]:
    """(the closest ``TRANSFORMER_PRESETS`` name, the backbone fields the checkpoint implies):
    Chameleon-7B is the ``7b`` preset exactly; anything else is ``tiny`` + overrides."""
    expected = expected_backbone(cfg, qk_norm=True, norm_reorder=bool(cfg.get("swin_norm")))
    for name, preset in TRANSFORMER_PRESETS.items():
        if not backbone_overrides(expected, preset):
            return name, expected
    return "tiny", expected


def chameleon_model(ckpt: HFCheckpoint, layout: ChameleonLayout) -> Chameleon:
    """The fusion network with every weight from the checkpoint."""
    model = Chameleon(layout.model_cfg.arch, layout.tokenizer.vocab_size, len(layout.codes),
                      layout.codes_per_image, unused_text_ids=list(layout.codes))
    problems = backbone_differences(
        expected_backbone(ckpt.config, True, bool(ckpt.config.get("swin_norm"))),
        model.transformer.cfg)
    assert not problems, problems  # the config was made from the checkpoint
    embed = ckpt.tensor("model.embed_tokens.weight")
    head = ckpt.tensor("lm_head.weight") if "lm_head.weight" in ckpt else embed
    state = transformer_state(ckpt, model.transformer.cfg.n_layers, qk_norm=True)
    state["embed.weight"] = gather_rows(embed, layout.row_source)
    state["lm_head.weight"] = gather_rows(head, layout.row_source)
    state = {k: v.to(torch.float32) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.folder}: weights left over after conversion: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
    return model


def chameleon_image_tokenizer(ckpt: HFCheckpoint, vqgan: tuple[str, str] | None = None):
    """fusion's VQ-GAN from the checkpoint's encoder and codebook, or from a whole
    taming-transformers VQ-GAN (checkpoint, YAML), whose codebook must then be the one the
    language model was trained with (same size and dimension)."""
    from fusion.convert.taming import ddconfig_from_hf, read_taming_vqgan, vqgan_from_taming

    vq = ckpt.config.get("vq_config") or {}
    prefix = "model.vqmodel."
    if vqgan is not None:
        settings, state = read_taming_vqgan(*vqgan)
        if settings["n_embed"] != vq.get("num_embeddings"):
            raise CheckpointError(f"--vqgan {vqgan[0]}: {settings['n_embed']} codes, the "
                                  f"language model knows {vq.get('num_embeddings')}")
        return vqgan_from_taming(state, settings["ddconfig"], settings["embed_dim"],
                                 settings["n_embed"],
                                 info={"converted_from": str(vqgan[0])})
    names = [n for n in ckpt.names() if n.startswith(prefix)]
    if not names:
        raise CheckpointError(f"{ckpt.folder}: no {prefix}* tensors (the VQ encoder)")
    log.warning("no --vqgan given: the image tokenizer's decoder is untrained (the Hugging "
                "Face checkpoint holds the VQ encoder only); images encode like Chameleon's "
                "but cannot be drawn")
    return vqgan_from_taming(ckpt.tensors(names), ddconfig_from_hf(vq),
                             int(vq["embed_dim"]), int(vq["num_embeddings"]), prefix=prefix,
                             with_decoder=False, info={"converted_from": str(ckpt.folder)})


def convert_chameleon(hf_folder: str | Path, out: str | Path,
                      vqgan: tuple[str, str] | None = None) -> Path:
    """Write the fusion model folder ``out`` (config.json, model.safetensors, tokenizer.json,
    image_tokenizer/) converted from the Hugging Face Chameleon folder ``hf_folder``."""
    from fusion.families.folders import save_model

    ckpt = HFCheckpoint(hf_folder, option="--hf")
    layout = chameleon_layout(ckpt)
    image_tokenizer = chameleon_image_tokenizer(ckpt, vqgan)
    model = chameleon_model(ckpt, layout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_tokenizer.save_pretrained(out / "image_tokenizer")
    tokenizer_file = layout.tokenizer.save(out / "tokenizer.json")  # + fusion's specials
    save_model(out, model, layout.model_cfg, str(tokenizer_file), str(out / "image_tokenizer"),
               extra={"image_size": layout.image_size, "steps": 0, "documents": "caption",
                      "converted_from": str(ckpt.folder)})
    log.info("converted %s -> %s (%d text ids, %d codes of %d per image)", ckpt.folder, out,
             layout.tokenizer.vocab_size, len(layout.codes), layout.codes_per_image)
    return out
