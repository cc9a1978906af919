"""A taming-transformers VQ-GAN (Esser et al. 2021, arXiv:2012.09841) as fusion's
:class:`~fusion.image.vqgan.VQTokenizer`: how a converted Chameleon / Anole model encodes and
decodes its images (docs/pretrained.md).

Meta's Chameleon release ships its image tokenizer in taming's own layout: ``vqgan.ckpt`` (a
PyTorch Lightning checkpoint whose ``state_dict`` holds the model and the training loss's
discriminator / LPIPS weights) and ``vqgan.yaml`` (``model.params``: ``embed_dim``,
``n_embed``, ``ddconfig``). Hugging Face's ``ChameleonForConditionalGeneration`` keeps the
encoder half under ``model.vqmodel.`` with the same names, but no decoder. Both go through
:func:`vqgan_from_taming` (the Hugging Face config through :func:`ddconfig_from_hf`).

Why diffusers' blocks fit: diffusers built ``Encoder`` / ``Decoder`` (those of ``VQModel``
and ``AutoencoderKL``) to load taming/LDM checkpoints, so they are the same networks under
other names: GroupNorm(32, eps 1e-6) + SiLU pre-activation ResNet blocks with a 1x1 shortcut
where the width changes, a stride-2 3x3 downsampling conv after zero padding (0, 1, 0, 1)
(diffusers' ``Downsample2D`` pads so when ``padding=0``, which ``Encoder`` passes), nearest x2
upsampling then a 3x3 conv, and one single-head attention at the lowest resolution between the
two mid-block ResNets (scale 1/sqrt(C), residual). What they cannot express is refused, with
the field that asks for it: attention inside the levels (``attn_resolutions``), a doubled
output (``double_z``), a first level wider than ``conv_in`` (``ch_mult[0] != 1``), other than
RGB in or out, a width GroupNorm(32) cannot split.

Names (taming -> fusion; L levels, R = num_res_blocks)::

    encoder.conv_in                          -> encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2}
                                             -> encoder.down_blocks.{i}.resnets.{j}.<same>
    encoder.down.{i}.block.{j}.nin_shortcut  -> encoder.down_blocks.{i}.resnets.{j}.conv_shortcut
    encoder.down.{i}.downsample.conv         -> encoder.down_blocks.{i}.downsamplers.0.conv
    {en,de}coder.mid.block_1 / block_2       -> {en,de}coder.mid_block.resnets.0 / 1
    {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}
        -> {en,de}coder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
           (1x1 convs (C, C, 1, 1) -> Linear weights (C, C))
    {en,de}coder.norm_out                    -> {en,de}coder.conv_norm_out
    {en,de}coder.conv_out                    -> {en,de}coder.conv_out
    decoder.conv_in                          -> decoder.conv_in
    decoder.up.{L-1-k}.block.{j}             -> decoder.up_blocks.{k}.resnets.{j}  (j <= R)
    decoder.up.{L-1-k}.upsample.conv         -> decoder.up_blocks.{k}.upsamplers.0.conv
    quant_conv / post_quant_conv             -> quant_conv / post_quant_conv
    quantize.embedding.weight (K, D)         -> the quantiser's codebook (set_codebook)
    loss.*                                   -> (ignored: training-only)

taming indexes the decoder's levels by resolution (``up.{L-1}`` runs first, and ``up.0`` has
no upsampling); diffusers lists them in the order they run, hence ``k = L-1-i``.

Shape legend: L = len(ch_mult) levels, R = num_res_blocks, C_i = ch * ch_mult[i] (the width of
level i), Z = z_channels (the encoder's output, fusion's ``latent_channels``), D = embed_dim
(the codebook's width, fusion's ``quant_conv_channels``), K = n_embed (codebook size),
f = 2 ** (L-1). An image (B, 3, H, W) -> z (B, Z, H/f, W/f) -> quant_conv (B, D, H/f, W/f)
-> codes (B, H/f, W/f) in [0, K).
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fusion.convert.llama import CheckpointError
from fusion.image.vqgan import VQTokenizer, frozen_codebook_quantizer

log = logging.getLogger(__name__)

GROUPS = 32  # taming's Normalize(): GroupNorm(num_groups=32, eps=1e-6) everywhere
CODEBOOK_KEY = "quantize.embedding.weight"
IGNORED_PREFIXES = ("loss.",)  # the discriminator and LPIPS of taming's training loss
DECODER_SIDE = ("decoder.", "post_quant_conv.")  # what only decoding needs
# ddconfig fields taming's Encoder/Decoder have no default for.
REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution",
            "z_channels")
# taming's (and LDM's) defaults for the rest, so a YAML that leaves one out means what it
# meant to taming.
TAMING_DEFAULTS: dict = {"ch_mult": [1, 2, 4, 8], "double_z": True, "dropout": 0.0,
                         "resamp_with_conv": True, "attn_type": "vanilla",
                         "use_linear_attn": False, "give_pre_end": False, "tanh_out": False}
# Hugging Face ChameleonVQVAEConfig field -> taming ddconfig field.
HF_TO_TAMING = {"double_latent": "double_z", "latent_channels": "z_channels",
                "resolution": "resolution", "in_channels": "in_channels",
                "base_channels": "ch", "channel_multiplier": "ch_mult",
                "num_res_blocks": "num_res_blocks", "attn_resolutions": "attn_resolutions",
                "dropout": "dropout", "attn_type": "attn_type"}
HF_OPTIONAL = {"attn_resolutions": None, "dropout": 0.0, "attn_type": "vanilla"}


class TamingConversionError(CheckpointError):
    """A taming VQ-GAN checkpoint or config that cannot be read, or that fusion's VQ-GAN
    cannot represent; the message names the file, field or key."""


# ---- reading the files -------------------------------------------------------------------
def read_taming_vqgan(checkpoint: str | Path, config_yaml: str | Path
                      ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a taming VQ-GAN: ``(config, state)``.

    ``config`` is ``{"ddconfig": {...}, "embed_dim": D, "n_embed": K}`` (the keyword
    arguments of :func:`vqgan_from_taming`), read from ``config_yaml``'s ``model.params``.
    ``state`` is the checkpoint's ``state_dict`` as is (``loss.*`` included; the converter
    ignores it). ``checkpoint`` is a ``.ckpt`` / ``.pt`` read with ``weights_only=True`` (a
    dict holding ``"state_dict"``, or a state dict itself), or a ``.safetensors`` state dict.

    Nothing is unpickled beyond tensors and plain containers: a checkpoint that needs more is
    refused with the way out (re-save its state dict as safetensors, where it is trusted).
    """
    return _read_config(Path(config_yaml).expanduser()), _read_state(
        Path(checkpoint).expanduser())


def _read_config(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise TamingConversionError(f"{path}: no such VQ-GAN config file (vqgan.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise TamingConversionError(f"{path}: not valid YAML ({err})") from err
    model = raw.get("model") if isinstance(raw, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise TamingConversionError(f"{path}: no model.params mapping (a taming VQ-GAN config "
                                    "holds model.params.{embed_dim, n_embed, ddconfig})")
    for key in ("embed_dim", "n_embed", "ddconfig"):
        if key not in params:
            raise TamingConversionError(f"{path}: model.params.{key} is missing")
    if not isinstance(params["ddconfig"], dict):
        raise TamingConversionError(f"{path}: model.params.ddconfig is not a mapping")
    if params.get("remap") is not None:
        # taming then renumbers codes through a .npy table: the codes would not be the rows
        # of the codebook that fusion's tokens index.
        raise TamingConversionError(f"{path}: model.params.remap={params['remap']!r} "
                                    "(remapped code indices) is not supported")
    return {"ddconfig": dict(params["ddconfig"]), "embed_dim": params["embed_dim"],
            "n_embed": params["n_embed"]}


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise TamingConversionError(f"{path}: no such VQ-GAN checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise TamingConversionError(f"{path}: corrupt or not a safetensors file "
                                        f"({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the class a checkpoint needs ("GLOBAL module.Class"); any other refusal
        # of its restricted unpickler is a file that is no checkpoint at all.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
            raise TamingConversionError(
                f"{path}: not a PyTorch checkpoint "
                f"({detail[1] if detail else str(err).splitlines()[0]})") from err
        raise TamingConversionError(
            f"{path}: the checkpoint pickles Python objects beyond tensors (e.g. {found[1]}), "
            "which torch.load(weights_only=True) refuses to build; fusion unpickles nothing "
            "but tensors and plain containers. If you trust the file, extract its weights "
            "once and pass the result: "
            "python -c \"import torch, safetensors.torch as st; st.save_file(torch.load("
            f"'{path}', map_location='cpu', weights_only=False)['state_dict'], "
            "'vqgan.safetensors')\"") from err
    except Exception as err:  # torch raises anything from KeyError to RuntimeError here
        raise TamingConversionError(f"{path}: not a readable PyTorch checkpoint "
                                    f"({type(err).__name__}: {err})") from err
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise TamingConversionError(f"{path}: expected a taming checkpoint (a dict with "
                                    f"'state_dict') or a state dict, got {type(obj).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TamingConversionError(f"{path}: state dict entries that are not tensors: "
                                    f"{_some(bad)}")
    return dict(state)


# ---- configs -----------------------------------------------------------------------------
def ddconfig_from_hf(vq_config: Mapping) -> dict:
    """A Hugging Face ``ChameleonVQVAEConfig`` (its dict, e.g. ``config.json``'s
    ``vq_config``) as the taming ``ddconfig`` it stands for, so the Hugging Face encoder goes
    through the same converter::

        vqgan_from_taming(state, ddconfig_from_hf(vq), vq["embed_dim"], vq["num_embeddings"],
                          prefix="model.vqmodel.", with_decoder=False)

    Hugging Face builds its attention only when ``attn_type == "vanilla"`` (anything else is
    an identity, with no weights), which is taming's ``attn_type="none"``. It has no
    decoder, so ``out_ch`` is Chameleon's RGB.
    """
    cfg = vq_config.to_dict() if hasattr(vq_config, "to_dict") else dict(vq_config)
    missing = [k for k in HF_TO_TAMING if k not in cfg and k not in HF_OPTIONAL]
    if missing:
        raise TamingConversionError(f"vq_config is missing {missing} (ChameleonVQVAEConfig "
                                    "fields)")
    cfg = {**HF_OPTIONAL, **cfg}
    dd = {taming: cfg[hf] for hf, taming in HF_TO_TAMING.items()}
    dd["attn_resolutions"] = list(dd["attn_resolutions"] or [])
    dd["attn_type"] = "vanilla" if dd["attn_type"] == "vanilla" else "none"
    dd["out_ch"] = 3
    return dd


def _normalise_ddconfig(ddconfig: Mapping, embed_dim: int, n_embed: int) -> dict:
    """``ddconfig`` with taming's defaults filled in and checked against what diffusers'
    ``Encoder`` / ``Decoder`` can represent; every refusal names its field."""
    if not isinstance(ddconfig, Mapping):
        raise TamingConversionError(f"ddconfig must be a mapping, got {type(ddconfig).__name__}")
    dd = {**TAMING_DEFAULTS, **dict(ddconfig)}
    missing = [k for k in REQUIRED if k not in dd]
    if missing:
        raise TamingConversionError(f"ddconfig is missing {missing}")
    unknown = sorted(set(dd) - set(REQUIRED) - set(TAMING_DEFAULTS))
    if unknown:  # taming's Encoder/Decoder take **kwargs and ignore them too
        log.warning("taming ddconfig: ignoring fields %s", unknown)
    try:
        for key in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
            dd[key] = _int(dd[key], f"ddconfig.{key}")
        dd["ch_mult"] = [_int(m, "ddconfig.ch_mult") for m in dd["ch_mult"]]
        dd["attn_resolutions"] = [_int(r, "ddconfig.attn_resolutions")
                                  for r in (dd["attn_resolutions"] or [])]
        embed_dim, n_embed = _int(embed_dim, "embed_dim"), _int(n_embed, "n_embed")
    except TypeError as err:
        raise TamingConversionError(f"ddconfig: {err}") from err

    def refuse(msg: str) -> None:
        raise TamingConversionError(f"taming VQ-GAN not supported: {msg}")

    if not dd["ch_mult"]:
        refuse("ddconfig.ch_mult is empty")
    if min(dd["ch"], dd["num_res_blocks"], dd["z_channels"], dd["resolution"], embed_dim,
           n_embed) < 1:
        refuse("ddconfig.ch, num_res_blocks, z_channels, resolution, embed_dim and n_embed "
               "must be positive")
    if dd["double_z"]:
        refuse("ddconfig.double_z=True doubles the encoder output (AutoencoderKL's mean and "
               "log-variance); a VQ-GAN quantises one feature map (double_z: false)")
    if dd["in_channels"] != 3 or dd["out_ch"] != 3:
        refuse(f"ddconfig.in_channels={dd['in_channels']}, out_ch={dd['out_ch']}: fusion's "
               "image tokenizers read and write RGB (3 and 3)")
    if dd["ch_mult"][0] != 1:
        # taming's conv_in gives ch channels and level 0 widens them to ch * ch_mult[0];
        # diffusers' conv_in gives level 0's width directly, with no block in between.
        refuse(f"ddconfig.ch_mult={dd['ch_mult']}: the first multiplier must be 1 (diffusers' "
               "conv_in outputs level 0's width)")
    if dd["use_linear_attn"] or dd["attn_type"] not in ("vanilla", "none"):
        refuse(f"ddconfig.attn_type={dd['attn_type']!r} (use_linear_attn="
               f"{dd['use_linear_attn']}): only 'vanilla' (softmax) or 'none' attention")
    levels = len(dd["ch_mult"])
    attn_at = [dd["resolution"] // 2 ** i for i in range(levels)
               if dd["resolution"] // 2 ** i in dd["attn_resolutions"]]
    if attn_at and dd["attn_type"] == "vanilla":
        refuse(f"ddconfig.attn_resolutions={dd['attn_resolutions']} puts attention inside the "
               f"levels at resolution {attn_at} (resolution={dd['resolution']}); diffusers' "
               "DownEncoderBlock2D / UpDecoderBlock2D have none (only the mid block's, which "
               "is always there)")
    if not dd["resamp_with_conv"]:
        refuse("ddconfig.resamp_with_conv=False (average-pool / conv-free resampling); "
               "diffusers' blocks resample with convolutions")
    if dd["give_pre_end"] or dd["tanh_out"]:
        refuse("ddconfig.give_pre_end / tanh_out change the decoder's output")
    widths = [dd["ch"] * m for m in dd["ch_mult"]]
    if any(w % GROUPS for w in widths):
        refuse(f"ddconfig.ch={dd['ch']} x ch_mult={dd['ch_mult']} gives widths {widths}, not "
               f"all divisible by GroupNorm's {GROUPS} groups")
    if dd["dropout"]:
        log.info("taming ddconfig.dropout=%s is dropped: diffusers' Encoder/Decoder have "
                 "none (it only acts in training)", dd["dropout"])
    return dd


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise TypeError(f"{name}={value!r} is not an integer")
    return int(value)


def autoencoder_config(ddconfig: Mapping, embed_dim: int) -> dict:
    """The ``VQTokenizer`` autoencoder config of a (normalised) taming ``ddconfig``."""
    return {"block_out_channels": [ddconfig["ch"] * m for m in ddconfig["ch_mult"]],
            "layers_per_block": ddconfig["num_res_blocks"],
            "latent_channels": ddconfig["z_channels"], "norm_num_groups": GROUPS,
            "mid_block_add_attention": ddconfig["attn_type"] == "vanilla", "norm": "group",
            "quant_conv_channels": int(embed_dim)}


# ---- names -------------------------------------------------------------------------------
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rules(levels: int) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """(fusion name pattern, its taming name) for every network weight; see the table above."""
    def up(k: str) -> int:  # diffusers' k-th up block is taming's level L-1-k
        return levels - 1 - int(k)

    rules = [
        (r"(encoder|decoder)\.conv_(in|out)\.(\w+)", lambda m: f"{m[1]}.conv_{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.conv_norm_out\.(\w+)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(\w+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET[m[3]]}.{m[4]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_[qkv]|to_out\.0)\.(\w+)",
         lambda m: f"{m[1]}.mid.attn_1.{_ATTN[m[2]]}.{m[3]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET[m[3]]}.{m[4]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)",
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(\w+)",
         lambda m: f"decoder.up.{up(m[1])}.block.{m[2]}.{_RESNET[m[3]]}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)",
         lambda m: f"decoder.up.{up(m[1])}.upsample.conv.{m[2]}"),
        (r"((?:post_)?quant_conv)\.(\w+)", lambda m: f"{m[1]}.{m[2]}"),
    ]
    return [(re.compile(p), f) for p, f in rules]


def taming_names(tok: VQTokenizer) -> dict[str, str]:
    """fusion state-dict key -> taming key, for every weight of ``tok`` but the quantiser's
    (the codebook goes through ``set_codebook``)."""
    rules = _rules(len(tok.block_out_channels))
    names = {}
    for key in tok.state_dict():
        if key.startswith("quantizer."):
            continue
        for pattern, name in rules:
            if (m := pattern.fullmatch(key)) is not None:
                names[key] = name(m)
                break
        else:  # fusion's VQTokenizer grew a weight this table does not know
            raise RuntimeError(f"no taming name for VQTokenizer weight {key!r}")
    return names


def _is_linear_from_conv(key: str) -> bool:
    return ".attentions.0.to_" in key and key.endswith(".weight")


# ---- the converter -----------------------------------------------------------------------
def vqgan_from_taming(state: Mapping[str, torch.Tensor], ddconfig: Mapping, embed_dim: int,
                      n_embed: int, *, prefix: str = "", with_decoder: bool = True,
                      info: dict | None = None) -> VQTokenizer:
    """A taming-layout VQ-GAN state dict as a :class:`VQTokenizer` (eval mode) that gives the
    same codes and, with ``with_decoder``, the same images.

    Args:
        state: tensors by taming name, each behind ``prefix`` (keys without it are not looked
            at, so a whole model's state dict can be passed); ``loss.*`` is ignored.
        ddconfig, embed_dim, n_embed: ``vqgan.yaml``'s ``model.params`` (see
            :func:`read_taming_vqgan`; :func:`ddconfig_from_hf` for a Hugging Face config).
        prefix: e.g. ``"model.vqmodel."`` for Hugging Face's ChameleonForConditionalGeneration.
        with_decoder: False for an encoder-only state dict (Hugging Face's): the decoder and
            ``post_quant_conv`` keep their random initialisation, ``info["decoder"]`` says
            ``"untrained"``, and decoder-side keys that are present are not read.
        info: provenance to keep in the artifact's ``config.json`` (e.g. the source files).

    Raises :class:`TamingConversionError` for a config diffusers' blocks cannot represent, a
    missing or unexpected key, or a tensor whose shape does not fit the config.
    """
    dd = _normalise_ddconfig(ddconfig, embed_dim, n_embed)
    embed_dim, n_embed = int(embed_dim), int(n_embed)
    where = f"state dict (prefix {prefix!r})" if prefix else "state dict"
    ours = {k[len(prefix):] for k in state if k.startswith(prefix)}
    if not ours:
        raise TamingConversionError(f"{where}: no key starts with {prefix!r}")

    tok = VQTokenizer(autoencoder_config(dd, embed_dim),
                      frozen_codebook_quantizer(n_embed, embed_dim))
    target = tok.state_dict()
    names = {f: t for f, t in taming_names(tok).items()
             if with_decoder or not f.startswith(DECODER_SIDE)}
    wanted = set(names.values()) | {CODEBOOK_KEY}

    skipped = {k for k in ours if k.startswith(IGNORED_PREFIXES)
               or (not with_decoder and k.startswith(DECODER_SIDE))}
    missing = sorted(wanted - ours)
    unexpected = sorted(ours - wanted - skipped)
    if missing or unexpected:
        msg = [f"{where} does not fit the taming VQ-GAN config "
               f"({_summary(dd, embed_dim, n_embed)})"]
        if missing:
            msg.append(f"{len(missing)} missing: {_some(missing, prefix)}")
            if with_decoder and all(k.startswith(DECODER_SIDE) for k in missing):
                msg.append("an encoder-only checkpoint (Hugging Face's Chameleon) needs "
                           "with_decoder=False")
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected: {_some(unexpected, prefix)}")
        raise TamingConversionError("; ".join(msg))

    def tensor(key: str) -> torch.Tensor:
        value = state[prefix + key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TamingConversionError(f"{prefix}{key}: expected a float tensor, got "
                                        f"{getattr(value, 'dtype', type(value).__name__)}")
        return value

    # taming's attention projections are 1x1 convs, diffusers' are Linear layers.
    expected = {t: tuple(target[f].shape) + ((1, 1) if _is_linear_from_conv(f) else ())
                for f, t in names.items()}
    expected[CODEBOOK_KEY] = (n_embed, embed_dim)
    found = {t: tuple(tensor(t).shape) for t in expected}
    wrong = [f"{prefix}{t} {found[t]} (expected {shape})"
             for t, shape in expected.items() if found[t] != shape]
    if wrong:
        raise TamingConversionError(f"{where}: {len(wrong)} tensors do not fit the taming "
                                    f"VQ-GAN config ({_summary(dd, embed_dim, n_embed)}): "
                                    f"{_some(wrong)}")

    with torch.no_grad():
        for f, t in names.items():
            target[f] = tensor(t).detach().reshape(target[f].shape).to(target[f].dtype)
        tok.load_state_dict(target, strict=True)
        tok.quantizer.set_codebook(tensor(CODEBOOK_KEY).detach())
    taming = {"ddconfig": dd, "embed_dim": embed_dim, "n_embed": n_embed}
    tok.info = {**(info or {}), "conversion": "fusion.convert.taming", "taming": taming,
                "decoder": "converted" if with_decoder else "untrained"}
    if not with_decoder:
        log.warning("VQ-GAN converted without a decoder (%s): its decoder and post_quant_conv "
                    "are random, so decode() gives noise until a trained decoder is loaded "
                    "(info['decoder'] = 'untrained')", where)
    return tok.eval()


def vqgan_from_taming_files(checkpoint: str | Path, config_yaml: str | Path,
                            info: dict | None = None) -> VQTokenizer:
    """:func:`read_taming_vqgan` then :func:`vqgan_from_taming`, keeping the file names in
    ``info`` (``converted_from``, ``converted_config``): Chameleon's ``tokenizer/vqgan.ckpt``
    + ``vqgan.yaml`` in one call."""
    config, state = read_taming_vqgan(checkpoint, config_yaml)
    source = {"converted_from": str(checkpoint), "converted_config": str(config_yaml)}
    return vqgan_from_taming(state, **config, info={**source, **(info or {})})


def _summary(dd: Mapping, embed_dim: int, n_embed: int) -> str:
    return (f"ch={dd['ch']}, ch_mult={dd['ch_mult']}, num_res_blocks={dd['num_res_blocks']}, "
            f"z_channels={dd['z_channels']}, embed_dim={embed_dim}, n_embed={n_embed}")


def _some(items: list[str], prefix: str = "", n: int = 8) -> str:
    shown = ", ".join(prefix + i for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
