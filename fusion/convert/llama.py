"""A Hugging Face Llama-family checkpoint as the shared backbone of either family.

``scripts/train.py init_backbone=/path/to/hf-folder`` fills, from a local folder written by
``LlamaForCausalLM.save_pretrained`` (``config.json`` + ``model.safetensors`` or its sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``):

* the shared transformer (every block and the final norm),
* the text rows of the token embedding and of the LM head,

and leaves the image parts at their fresh initialisation (Chameleon's code rows; Transfusion's
patchifier, timestep embedding and diffusion head). This is how Show-o, Janus and LMFusion
start their shared transformer (docs/pretrained.md).

The mapping is one-to-one because fusion's blocks are Llama's: pre-norm RMSNorm, SwiGLU,
grouped-query attention and RoPE in the "rotate-half" channel order that Hugging Face's
Llama weights already use (their conversion script permutes Meta's interleaved q/k rows), so
no weight is permuted here::

    model.embed_tokens                      -> embed (rows [0, n_text))
    model.layers.{i}.self_attn.{q,k,v,o}_proj -> transformer.layers.{i}.attention.{wq,wk,wv,wo}
    model.layers.{i}.mlp.{gate,up,down}_proj  -> transformer.layers.{i}.feed_forward.{w1,w3,w2}
    model.layers.{i}.input_layernorm          -> transformer.layers.{i}.attention_norm
    model.layers.{i}.post_attention_layernorm -> transformer.layers.{i}.ffn_norm
    model.norm                                -> transformer.norm
    lm_head (or model.embed_tokens when tied) -> lm_head (rows [0, n_text))

Checkpoint and run must agree on every shape and switch; a mismatch is refused before any
weight is touched, naming each field and the override that fixes it (Chameleon's converter,
``fusion.convert.chameleon``, uses the same reader and checks).

Shape legend: V_hf = the checkpoint's embedding rows, V = the fusion model's vocabulary,
D = hidden size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion.config import resolve_path
from fusion.data.text import BOS, EOS, PAD, SPECIAL_TOKENS, TextTokenizer
from fusion.errors import UserError
from fusion.families.folders import text_tokenizer_fingerprint
from fusion.models.transformer import TransformerConfig

log = logging.getLogger(__name__)

# Hugging Face model types whose blocks are fusion's without changes.
LLAMA_TYPES = ("llama",)
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


class CheckpointError(UserError):
    """A pretrained checkpoint that cannot be read, or that does not fit the run."""


# ---- reading a Hugging Face folder ---------------------------------------------------------
class HFCheckpoint:
    """A local Hugging Face model folder: its ``config.json`` and its safetensors tensors,
    read one by one on demand (a 7B checkpoint is never held twice in memory)."""

    def __init__(self, folder: str | Path, option: str = "init_backbone"):
        self.folder = resolve_path(folder)
        self.option = option
        if not self.folder.is_dir():
            raise CheckpointError(f"{option}={folder}: no such folder")
        cfg_file = self.folder / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{option}={folder}: no config.json (a Hugging Face model "
                                  "folder, as save_pretrained writes it, is expected)")
        try:
            self.config: dict = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({err})") from err
        self._where = self._locate_tensors()

    def _locate_tensors(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it."""
        from safetensors import safe_open

        index, single = self.folder / INDEX, self.folder / WEIGHTS
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
            return {name: self.folder / file for name, file in weight_map.items()}
        if single.is_file():
            try:
                with safe_open(str(single), "pt") as f:
                    return dict.fromkeys(f.keys(), single)
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{single}: corrupt or not safetensors ({err})") from err
        pickled = sorted(p.name for p in self.folder.glob("*.bin"))
        hint = (f" It holds {pickled}: pickled weights, which fusion does not load; convert "
                "them once with transformers (from_pretrained, then save_pretrained with "
                "safe_serialization=True)." if pickled else "")
        raise CheckpointError(f"{self.option}={self.folder}: no {WEIGHTS} or {INDEX}.{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._where:
            raise CheckpointError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        file = self._where[name]
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {INDEX} for {name})")
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(name)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors, opening each shard once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._where:
                raise CheckpointError(f"{self.folder}: the checkpoint has no tensor {name!r}")
            by_file.setdefault(self._where[name], []).append(name)
        out = {}
        for file, group in tqdm(by_file.items(), desc=f"reading {self.folder.name}",
                                unit="file", disable=len(by_file) < 2, leave=False):
            with safe_open(str(file), "pt") as f:
                out.update({n: f.get_tensor(n) for n in group})
        return out


# ---- configuration checks -------------------------------------------------------------------
def rope_theta(hf_config: dict) -> float:
    """RoPE base from a Hugging Face config: ``rope_parameters.rope_theta`` (transformers 5)
    or ``rope_theta`` (earlier files); 10000 when neither is there (Llama's default)."""
    params = hf_config.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def unsupported_features(hf_config: dict, where: str) -> list[str]:
    """Parts of a Llama-style checkpoint that fusion's blocks do not have."""
    out = []
    heads = hf_config.get("num_attention_heads")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != hf_config.get("hidden_size"):
        out.append(f"{where}: head_dim={head_dim} with {heads} heads is not "
                   f"hidden_size={hf_config.get('hidden_size')} (fusion's heads split D)")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            out.append(f"{where}: {key}=true (fusion's projections have no bias)")
    if hf_config.get("hidden_act", "silu") != "silu":
        out.append(f"{where}: hidden_act={hf_config['hidden_act']!r} (fusion's SwiGLU uses "
                   "silu)")
    rope_type = rope_parameters(hf_config).get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        out.append(f"{where}: rope_type={rope_type!r} (fusion's RoPE takes 'default' and "
                   "'llama3' frequencies only)")
    return out


def rope_parameters(hf_config: dict) -> dict:
    """RoPE settings, from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (earlier files), with ``rope_type`` always set."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def rope_scaling(hf_config: dict) -> dict | None:
    """:attr:`TransformerConfig.rope_scaling` for the checkpoint's RoPE (None = unscaled)."""
    params = rope_parameters(hf_config)
    if params["rope_type"] != "llama3":
        return None
    from fusion.models.transformer import ROPE_SCALING_KEYS

    scaling = {"type": "llama3", **{k: params.get(k) for k in ROPE_SCALING_KEYS}}
    if scaling["original_max_position_embeddings"] is None:
        scaling["original_max_position_embeddings"] = hf_config.get("max_position_embeddings")
    return scaling


def expected_backbone(hf_config: dict, qk_norm: bool = False,
                      norm_reorder: bool = False) -> dict:
    """The :class:`TransformerConfig` fields a Llama-style config implies."""
    return {"d_model": hf_config["hidden_size"], "n_layers": hf_config["num_hidden_layers"],
            "n_heads": hf_config["num_attention_heads"],
            "n_kv_heads": hf_config.get("num_key_value_heads")
            or hf_config["num_attention_heads"],
            "ffn_dim": hf_config["intermediate_size"], "rope_theta": rope_theta(hf_config),
            "rope_scaling": rope_scaling(hf_config),
            "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
            "qk_norm": qk_norm, "norm_reorder": norm_reorder}


# The Hugging Face field behind each backbone field, for the messages.
HF_NAMES = {"d_model": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
            "ffn_dim": "intermediate_size", "rope_theta": "rope_theta",
            "norm_eps": "rms_norm_eps", "qk_norm": "QK-norm", "norm_reorder": "swin_norm",
            "rope_scaling": "rope_parameters"}


def backbone_differences(expected: dict, backbone: TransformerConfig,
                         where: str = "model.arch.backbone_overrides.") -> list[str]:
    """``field: checkpoint X (its hf name), this run Y; set <override>=X`` for each field of
    ``backbone`` that differs from ``expected``."""
    out = []
    for name, want in expected.items():
        have = getattr(backbone, name)
        same = abs(have - want) <= 1e-12 * abs(want) if isinstance(want, float) else have == want
        if not same:
            override = "ffn_hidden" if name == "ffn_dim" else name
            value = hydra_value(want)
            out.append(f"{name}: checkpoint {want!r} ({HF_NAMES[name]}), this run {have!r}; "
                       f"set ++{where}{override}={value}")
    return out


def hydra_value(value) -> str:
    """``value`` as a Hydra command-line override writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def backbone_overrides(expected: dict, preset: dict) -> dict:
    """Overrides of a ``TRANSFORMER_PRESETS`` entry that give the ``expected`` fields (what a
    converted model folder records as ``model.arch.backbone_overrides``)."""
    base = TransformerConfig(**preset)
    out = {}
    for name, want in expected.items():
        if getattr(base, name) != want:
            out["ffn_hidden" if name == "ffn_dim" else name] = want
    return out


# ---- weights --------------------------------------------------------------------------------
def block_names(i: int, qk_norm: bool = False, prefix: str = "model.") -> dict[str, str]:
    """fusion name -> Hugging Face name of block ``i``'s tensors."""
    ours, theirs = f"transformer.layers.{i}.", f"{prefix}layers.{i}."
    names = {f"{ours}attention.w{p}.weight": f"{theirs}self_attn.{p}_proj.weight"
             for p in "qkvo"}
    names.update({f"{ours}feed_forward.{w}.weight": f"{theirs}mlp.{hf}_proj.weight"
                  for w, hf in (("w1", "gate"), ("w3", "up"), ("w2", "down"))})
    names[f"{ours}attention_norm.weight"] = f"{theirs}input_layernorm.weight"
    names[f"{ours}ffn_norm.weight"] = f"{theirs}post_attention_layernorm.weight"
    if qk_norm:  # Chameleon: per-head LayerNorm affine, (H, Dh) there, (H, 1, Dh) here
        for qk in "qk":
            for part in ("weight", "bias"):
                names[f"{ours}attention.{qk}_norm.{part}"] = (
                    f"{theirs}self_attn.{qk}_norm.{part}")
    return names


def transformer_state(ckpt: HFCheckpoint, n_layers: int, qk_norm: bool = False,
                      prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The shared transformer's state dict (``transformer.*`` keys) from the checkpoint."""
    names = {"transformer.norm.weight": f"{prefix}norm.weight"}
    for i in range(n_layers):
        names.update(block_names(i, qk_norm, prefix))
    theirs = ckpt.tensors(names.values())
    state = {ours: theirs[hf] for ours, hf in names.items()}
    for key, value in state.items():
        if key.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
            state[key] = value.unsqueeze(1)  # (H, Dh) -> (H, 1, Dh)
    return state


def gather_rows(weight: torch.Tensor, source: list[int]) -> torch.Tensor:
    """(V_hf, D) -> (len(source), D): row ``source[j]`` of the checkpoint for id j, or its mean
    row where ``source[j]`` is -1 (a token the checkpoint never learnt: fusion's special
    tokens appended to its tokenizer). The mean keeps a new token's embedding and logit in the
    range of the others instead of at a random scale (Hewitt 2021, "Initializing new word
    embeddings for pretrained language models")."""
    index = torch.tensor(source, dtype=torch.long)
    out = weight[index.clamp(min=0)]
    out[index < 0] = weight.float().mean(0).to(weight.dtype)
    return out


def text_row_sources(tokenizer: TextTokenizer, n_rows: int, fresh: Iterable[int],
                     aliases: dict | None = None) -> list[int]:
    """Checkpoint row of each text id: id i takes row i, except ids past the checkpoint's
    ``n_rows`` rows and the ``fresh`` ids (fusion's special tokens appended to its
    tokenizer), which take the mean row (-1). A fresh special token named in ``aliases``
    (fusion token -> checkpoint id, e.g. ``{"<bos>": bos_token_id}``) takes that id's row
    instead: it plays the part the checkpoint learnt that token for."""
    fresh = set(fresh)
    source = [i if i < n_rows and i not in fresh else -1 for i in range(tokenizer.vocab_size)]
    for token, row in (aliases or {}).items():
        row = row[0] if isinstance(row, list) and row else row  # Llama 3 lists its eos ids
        if tokenizer.token_id(token) in fresh and isinstance(row, int) and 0 <= row < n_rows:
            source[tokenizer.token_id(token)] = row
    return source


# ---- the text tokenizer ---------------------------------------------------------------------
def added_special_ids(folder: Path, tokenizer: TextTokenizer, own=None) -> list[int]:
    """Ids of fusion's special tokens that the folder's own ``tokenizer.json`` (or ``own``, a
    ``tokenizers.Tokenizer`` read from it) lacks (appended by :class:`TextTokenizer`), whose
    rows start fresh."""
    from tokenizers import Tokenizer

    own = own or Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tokenizer.token_id(t) for t in SPECIAL_TOKENS if own.token_to_id(t) is None]


def check_text_tokenizer(ckpt: HFCheckpoint, tokenizer: TextTokenizer,
                         run_path: str) -> list[str]:
    """The run's text tokenizer must be the checkpoint's (``tokenizer.json`` in its folder),
    since the embedding rows are indexed by its ids."""
    own_file = ckpt.folder / "tokenizer.json"
    fix = f"set data.text_tokenizer={own_file}"
    if not own_file.is_file():
        return [f"text tokenizer: {ckpt.folder} has no tokenizer.json; fusion needs the "
                "checkpoint's own tokenizer (the fast-tokenizer JSON that save_pretrained "
                "writes)"]
    own = TextTokenizer.from_file(own_file)
    if text_tokenizer_fingerprint(own) != text_tokenizer_fingerprint(tokenizer):
        return [f"text tokenizer: this run's ({run_path}) is not the checkpoint's; {fix}"]
    base = own.vocab_size - len(added_special_ids(ckpt.folder, own))
    if base > ckpt.config.get("vocab_size", base):
        return [f"vocabulary: the checkpoint's tokenizer has {base} tokens but its embedding "
                f"only {ckpt.config['vocab_size']} rows (vocab_size)"]
    return []


# ---- the entry point ------------------------------------------------------------------------
def load_llama_backbone(model: nn.Module, folder: str | Path, tokenizer: TextTokenizer,
                        tokenizer_path: str = "data.text_tokenizer") -> None:
    """Fill ``model`` (a fresh Chameleon or Transfusion model) from the Llama-family
    checkpoint in ``folder``; raises :class:`CheckpointError` listing every difference
    between checkpoint and run first. ``tokenizer`` is the run's text tokenizer, which must be
    the checkpoint's."""
    ckpt = HFCheckpoint(folder)
    cfg = ckpt.config
    where = f"init_backbone={folder}"
    model_type = cfg.get("model_type")
    if model_type not in LLAMA_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; "
                              f"init_backbone takes {list(LLAMA_TYPES)} checkpoints "
                              "(docs/pretrained.md)")
    problems = unsupported_features(cfg, where)
    if not problems:
        problems += backbone_differences(expected_backbone(cfg), model.transformer.cfg)
        problems += check_text_tokenizer(ckpt, tokenizer, tokenizer_path)
        tied_here = model.lm_head.weight is model.embed.weight
        if tied_here and not cfg.get("tie_word_embeddings", False):
            problems.append("tie_embeddings: the checkpoint has separate input and output "
                            "embeddings; set model.arch.tie_embeddings=false")
    if problems:
        raise CheckpointError(f"{where} does not fit this run:\n  - " + "\n  - ".join(problems))

    n_text = tokenizer.vocab_size
    fresh = added_special_ids(ckpt.folder, tokenizer)
    embed = ckpt.tensor("model.embed_tokens.weight")
    tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in ckpt
    head = embed if tied else ckpt.tensor("lm_head.weight")
    state = transformer_state(ckpt, model.transformer.cfg.n_layers)
    with torch.no_grad():
        rows = text_row_sources(tokenizer, embed.shape[0], fresh,
                                {BOS: cfg.get("bos_token_id"), EOS: cfg.get("eos_token_id"),
                                 PAD: cfg.get("pad_token_id")})
        for param, source in ((model.embed.weight, embed), (model.lm_head.weight, head)):
            param[:n_text] = gather_rows(source, rows).to(param.dtype)
            if model.lm_head.weight is model.embed.weight:
                break
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # the names come from the model's own config
    log.info("init_backbone: %d backbone tensors and %d text rows from %s (%d of fusion's "
             "special tokens were new: <bos>/<eos>/<pad> take the checkpoint's, the others its "
             "mean row); the image parts start fresh", len(state), n_text, ckpt.folder,
             len(fresh))
