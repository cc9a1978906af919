"""A Hugging Face Llama checkpoint as the shared backbone (fusion.convert.llama): fusion's text
logits equal transformers' on the same ids, for both families, and every checkpoint that does
not fit is refused naming what differs. transformers is a test-only dependency here; the
checkpoints are tiny random ones written by save_pretrained, nothing is downloaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusion.convert.llama import CheckpointError, load_llama_backbone  # noqa: E402
from fusion.data.text import SPECIAL_TOKENS, TextTokenizer, shapes_corpus  # noqa: E402
from fusion.models.attention import layout_from_segments  # noqa: E402
from fusion.models.chameleon import Chameleon  # noqa: E402
from fusion.models.schemas import ChameleonConfig, TransfusionConfig  # noqa: E402
from fusion.models.transfusion import Transfusion  # noqa: E402

HF_VOCAB = 320  # embedding rows: more than the tokenizer's 300, as real checkpoints pad
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
# the fusion backbone overrides that match SHAPE
MATCHING = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                rope_theta=500000.0, norm_eps=1e-5, max_seq_len=128)


def own_tokenizer(path: Path) -> Path:
    """A byte-level BPE with Llama's own specials and none of fusion's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(shapes_corpus(300), trainer=trainer)
    assert tok.get_vocab_size() == 300
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def write_llama(path: Path, tie: bool = False, shard: bool = False, **config) -> Path:
    """A random LlamaForCausalLM folder (norm weights random too, so a swapped norm shows)."""
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    cfg = transformers.LlamaConfig(vocab_size=HF_VOCAB, tie_word_embeddings=tie,
                                   **{**SHAPE, **rope, **config})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **({"max_shard_size": "100KB"} if shard else {}))
    own_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_llama(tmp_path_factory.mktemp("llama"))


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def transfusion(tokenizer, tie: bool = False, **overrides) -> Transfusion:
    cfg = TransfusionConfig(backbone_overrides={**MATCHING, **overrides}, latent_channels=4,
                            latent_size=8, tie_embeddings=tie)
    return Transfusion(cfg, tokenizer.vocab_size).eval()


def chameleon(tokenizer, **overrides) -> Chameleon:
    cfg = ChameleonConfig(backbone_overrides={**MATCHING, "qk_norm": False, **overrides})
    return Chameleon(cfg, tokenizer.vocab_size, codebook_size=16, codes_per_image=4).eval()


def fusion_logits(model, ids: torch.Tensor) -> torch.Tensor:
    layout = layout_from_segments([[(0, "text", ids.shape[1])]] * ids.shape[0])
    with torch.no_grad():
        out = model(ids, layout)
    return out[1] if isinstance(out, tuple) else out


def random_ids(n_rows: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 300, (n_rows, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_text_logits_equal_transformers(llama, family):
    tok = TextTokenizer.from_file(llama / "tokenizer.json")
    assert tok.vocab_size == 300 + len(SPECIAL_TOKENS)  # fusion's specials appended
    model = transfusion(tok) if family == "transfusion" else chameleon(tok)
    load_llama_backbone(model, llama, tok)
    ids = random_ids()
    ours, theirs = fusion_logits(model, ids), hf_logits(llama, ids)
    assert theirs.abs().max() > 0.1  # not a trivially zero model
    torch.testing.assert_close(ours[..., :300], theirs[..., :300], atol=2e-5, rtol=1e-4)


def test_new_rows_start_at_the_mean_or_their_alias_and_image_rows_stay_fresh(llama):
    tok = TextTokenizer.from_file(llama / "tokenizer.json")
    model = chameleon(tok)
    code_rows = model.embed.weight[tok.vocab_size:].clone()
    load_llama_backbone(model, llama, tok)
    from safetensors.torch import load_file

    hf = load_file(str(llama / "model.safetensors"))
    mean = hf["model.embed_tokens.weight"].mean(0)
    torch.testing.assert_close(model.embed.weight[:300], hf["model.embed_tokens.weight"][:300])
    torch.testing.assert_close(model.lm_head.weight[:300], hf["lm_head.weight"][:300])
    for i in (tok.pad_id, tok.boi_id, tok.sentinel_ids()[-1]):  # new to the checkpoint
        torch.testing.assert_close(model.embed.weight[i], mean)
    # fusion's <bos>/<eos> take the rows of the checkpoint's bos/eos ids (<s>, </s>)
    cfg = json.loads((llama / "config.json").read_text())
    for ours, theirs in ((tok.bos_id, cfg["bos_token_id"]), (tok.eos_id, cfg["eos_token_id"])):
        torch.testing.assert_close(model.embed.weight[ours], hf["model.embed_tokens.weight"][theirs])
        torch.testing.assert_close(model.lm_head.weight[ours], hf["lm_head.weight"][theirs])
    torch.testing.assert_close(model.embed.weight[tok.vocab_size:], code_rows)


def test_sharded_and_tied_checkpoints(tmp_path):
    folder = write_llama(tmp_path / "tied", tie=True, shard=True)
    assert (folder / "model.safetensors.index.json").is_file()
    tok = TextTokenizer.from_file(folder / "tokenizer.json")
    ids = random_ids()
    for model in (transfusion(tok, tie=True), transfusion(tok), chameleon(tok)):
        load_llama_backbone(model, folder, tok)
        torch.testing.assert_close(fusion_logits(model, ids)[..., :300],
                                   hf_logits(folder, ids)[..., :300], atol=2e-5, rtol=1e-4)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.1/3.2's long-context RoPE: with L = 64 and Dh = 16 the eight frequencies
    fall in all three bands (kept, blended, divided), over 100 positions."""
    from fusion.models.transformer import rope_frequencies

    folder = write_llama(tmp_path / "llama3", rope_parameters=LLAMA3_ROPE)
    tok = TextTokenizer.from_file(folder / "tokenizer.json")
    scaling = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items()
                                    if k not in ("rope_type", "rope_theta")}}
    freqs = rope_frequencies(16, 500000.0)
    scaled = rope_frequencies(16, 500000.0, scaling)
    kept, divided = scaled == freqs, torch.isclose(scaled, freqs / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any()
    with pytest.raises(CheckpointError, match=r"rope_scaling=\{type: llama3, factor: 8.0"):
        load_llama_backbone(transfusion(tok), folder, tok)  # unscaled run: refused, with the fix
    model = transfusion(tok, rope_scaling=scaling)
    load_llama_backbone(model, folder, tok)
    ids = random_ids(2, 100)
    torch.testing.assert_close(fusion_logits(model, ids)[..., :300],
                               hf_logits(folder, ids)[..., :300], atol=2e-5, rtol=1e-4)


def test_untied_checkpoint_into_a_tied_model_is_refused(llama):
    tok = TextTokenizer.from_file(llama / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tie_embeddings=false"):
        load_llama_backbone(transfusion(tok, tie=True), llama, tok)


def test_mismatched_shapes_are_refused_naming_each_field(llama):
    tok = TextTokenizer.from_file(llama / "tokenizer.json")
    model = transfusion(tok, n_kv_heads=4, rope_theta=10000.0, ffn_hidden=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_llama_backbone(model, llama, tok)
    msg = str(err.value)
    for field in ("n_kv_heads: checkpoint 2 (num_key_value_heads)",
                  "backbone_overrides.n_kv_heads=2", "rope_theta: checkpoint 500000.0",
                  "backbone_overrides.ffn_hidden=96"):
        assert field in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_chameleon_qk_norm_is_refused_for_a_llama(llama):
    tok = TextTokenizer.from_file(llama / "tokenizer.json")
    with pytest.raises(CheckpointError, match="backbone_overrides.qk_norm=false"):
        load_llama_backbone(chameleon(tok, qk_norm=True), llama, tok)


def test_another_text_tokenizer_is_refused(llama, tokenizer):
    model = transfusion(tokenizer)
    with pytest.raises(CheckpointError, match="data.text_tokenizer=.*tokenizer.json"):
        load_llama_backbone(model, llama, tokenizer, "tokenizers/shapes-bpe/tokenizer.json")


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type='yarn'"),
    (dict(model_type="mistral"), "model_type 'mistral' is not supported"),
])
def test_unsupported_checkpoints_are_refused(llama, tmp_path, change, message):
    folder = tmp_path / "changed"
    shutil.copytree(llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    tok = TextTokenizer.from_file(folder / "tokenizer.json")
    with pytest.raises(CheckpointError, match=message):
        load_llama_backbone(transfusion(tok), folder, tok)


def test_unreadable_folders_are_refused(llama, tmp_path):
    tok = TextTokenizer.from_file(llama / "tokenizer.json")
    with pytest.raises(CheckpointError, match="no such folder"):
        load_llama_backbone(transfusion(tok), tmp_path / "absent", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_llama_backbone(transfusion(tok), tmp_path / "empty", tok)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickled weights, which fusion does not load"):
        load_llama_backbone(transfusion(tok), pickled, tok)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_llama_backbone(transfusion(tok), corrupt, tok)


@pytest.mark.slow
def test_train_script_starts_from_the_llm(llama, tmp_path):
    """scripts/train.py init_backbone=... trains Transfusion from the LLM and records it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    overrides = [f"++model.arch.backbone_overrides.{k}={v}" for k, v in MATCHING.items()]
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "experiment=transfusion_tiny", "debug=default",
         f"init_backbone={llama}", f"data.text_tokenizer={llama / 'tokenizer.json'}",
         *overrides, "logger=csv", f"output_dir={out}", "sampling.diffusion_steps=2",
         "sampling.prompts=[a red circle]"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["init_backbone"] == str(llama) and meta["steps"] == 4
    assert "the LLM" in (out / "model" / "README.md").read_text()
    both = subprocess.run(
        [sys.executable, "scripts/train.py", "experiment=transfusion_tiny", "debug=default",
         f"init_backbone={llama}", f"init_from={out / 'model'}", f"output_dir={out}2"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "init_from and init_backbone both set" in both.stderr


def test_bad_rope_scaling_settings_are_refused():
    from fusion.models.transformer import TransformerConfig

    for bad, message in [({"type": "yarn", "factor": 4.0}, "type 'yarn' is not supported"),
                         ({"type": "llama3", "factor": 8.0}, "needs \\['low_freq_factor'"),
                         ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                           "high_freq_factor": 1.0, "original_max_position_embeddings": 64},
                          "high_freq_factor > low_freq_factor")]:
        with pytest.raises(ValueError, match=message):
            TransformerConfig(rope_scaling=bad)
