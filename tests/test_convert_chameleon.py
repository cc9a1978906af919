"""Hugging Face Chameleon -> fusion Chameleon-family model folder (fusion.convert.chameleon):
on a mixed text + image-code document the converted model's logits equal transformers' (each
fusion id against the Chameleon token it came from), an image encodes to the same codes, and
the folder loads, samples and fine-tunes like any fusion model folder. The checkpoints are
tiny random ones written by save_pretrained; nothing is downloaded."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusion.convert.chameleon import (  # noqa: E402
    chameleon_layout,
    chameleon_model,
)
from fusion.convert.llama import CheckpointError, HFCheckpoint  # noqa: E402
from fusion.data.text import shapes_corpus  # noqa: E402
from fusion.models.attention import layout_from_segments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_CODES, RESOLUTION = 16, 32  # a 3-level VQ encoder (f = 4): 8x8 = 64 codes per image
VQ = dict(embed_dim=32, num_embeddings=N_CODES, latent_channels=32, resolution=RESOLUTION,
          base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1)


def code_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def write_tokenizer(folder: Path) -> dict[str, int]:
    """Chameleon's layout in small: <s> <pad> </s> <unk>, then the image tokens (in a shuffled
    code order, so the BPE -> code map is not the identity), <eoss>, <racm3:break>, text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    codes = list(range(N_CODES))
    random.Random(0).shuffle(codes)
    specials = (["<s>", "<pad>", "</s>", "<unk>"] + [code_name(c) for c in codes]
                + ["<eoss>", "<racm3:break>", "<image>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(shapes_corpus(300), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab(with_added_tokens=True)


def write_chameleon(folder: Path, swin_norm: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    cfg = transformers.ChameleonConfig(
        vocab_size=352, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=256, swin_norm=swin_norm, vocabulary_map=vocab,
        vq_config=VQ, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"])
    torch.manual_seed(0)
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and QK-norm affines, so a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name and "vqmodel" not in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_chameleon(tmp_path_factory) -> Path:
    return write_chameleon(tmp_path_factory.mktemp("chameleon") / "hf")


def hf_raw_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits before it masks the image tokens out of them."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("swin_norm", [False, True])
def test_logits_equal_transformers_on_a_mixed_document(tmp_path, hf_chameleon, swin_norm):
    folder = hf_chameleon if not swin_norm else write_chameleon(tmp_path / "swin", True)
    ckpt = HFCheckpoint(folder)
    layout = chameleon_layout(ckpt)
    assert layout.model_cfg.arch.backbone_overrides.get("norm_reorder", False) is swin_norm
    model = chameleon_model(ckpt, layout).eval()
    vocab = ckpt.config["vocabulary_map"]
    tok = layout.tokenizer
    img2bpe = {c: b for b, c in layout.codes.items()}
    codes = torch.randint(0, N_CODES, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    text = tok.encode("a red circle above a blue square")
    theirs = ([vocab["<s>"]] + text + [vocab["<racm3:break>"]] + [img2bpe[c] for c in codes]
              + [vocab["<eoss>"]] + text + [vocab["</s>"]])
    ours = ([tok.bos_id] + text + [tok.boi_id] + [tok.vocab_size + c for c in codes]
            + [tok.eoi_id] + text + [tok.eos_id])
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(folder).eval()
    hf_logits = hf_raw_logits(hf, torch.tensor([theirs]))
    with torch.no_grad():
        fusion_logits = model(torch.tensor([ours]),
                              layout_from_segments([[(0, "text", len(ours))]]))
    source = torch.tensor(layout.row_source)
    learnt = source >= 0  # the ids with a Chameleon row (not fusion's appended sentinels)
    assert hf_logits.abs().max() > 0.1
    torch.testing.assert_close(fusion_logits[..., learnt], hf_logits[..., source[learnt]],
                               atol=3e-5, rtol=1e-4)
    # and transformers' own output agrees on every id it does not mask
    with torch.no_grad():
        official = hf(input_ids=torch.tensor([theirs])).logits
    text_ids = [i for i in range(tok.vocab_size) if 0 <= layout.row_source[i]
                and layout.row_source[i] not in layout.codes]
    torch.testing.assert_close(fusion_logits[..., text_ids],
                               official[..., source[text_ids]], atol=3e-5, rtol=1e-4)


def test_image_tokens_become_unused_text_ids(hf_chameleon):
    ckpt = HFCheckpoint(hf_chameleon)
    layout = chameleon_layout(ckpt)
    bpe_ids = sorted(layout.codes)
    assert bpe_ids == list(range(4, 4 + N_CODES))
    assert sorted(layout.codes.values()) == list(range(N_CODES))
    assert layout.codes == layout.tokenizer.chameleon_image_tokens()
    assert layout.codes[layout.tokenizer.id_of(code_name(12))] == 12
    model = chameleon_model(ckpt, layout)
    mask = model.unused_text_mask()
    assert mask[bpe_ids].all() and int(mask.sum()) == N_CODES
    assert "unused_text" not in model.state_dict()  # derived from the tokenizer, not saved


def test_broken_checkpoints_are_refused(hf_chameleon, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_chameleon, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vq_config"]["num_embeddings"] = N_CODES + 1
    (bad / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<racm3:break>"]
    tok["model"]["vocab"].pop("<racm3:break>", None)
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError) as err:
        chameleon_layout(HFCheckpoint(bad))
    assert "do not name the codes" in str(err.value) and "no <racm3:break>" in str(err.value)
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        chameleon_layout(HFCheckpoint(bad))


@pytest.fixture(scope="module")
def converted(hf_chameleon) -> Path:
    """The tiny checkpoint through scripts/convert.py (no --vqgan: encoder-only VQ-GAN)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_script", ROOT / "scripts/convert.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = hf_chameleon.parent / "fusion"
    script.main(["chameleon", "--hf", str(hf_chameleon), "--out", str(out)])
    return out


def test_an_image_encodes_to_chameleons_codes(hf_chameleon, converted):
    from fusion.image.vqgan import VQTokenizer

    vq = VQTokenizer.from_pretrained(converted / "image_tokenizer")
    assert vq.info["decoder"] == "untrained"
    pixels = torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(3))
    pixels = pixels * 2 - 1
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(hf_chameleon).eval()
    with torch.no_grad():
        theirs = hf.model.get_image_tokens(pixels)  # (B, N) Chameleon BPE ids
        codes = vq.encode(pixels).flatten(1)  # (B, N) codes
    layout = chameleon_layout(HFCheckpoint(hf_chameleon))
    assert codes.unique().numel() > 1  # not a constant map
    assert torch.equal(theirs.apply_(lambda b: layout.codes[b]), codes)


def test_the_converted_folder_loads_and_samples(converted):
    from fusion import FusionPipeline

    meta = json.loads((converted / "config.json").read_text())
    assert meta["model"]["family"] == "chameleon" and meta["converted_from"]
    assert meta["image_size"] == RESOLUTION
    pipe = FusionPipeline.from_pretrained(converted)
    images = pipe("a red circle", output_type="pt", progress=False, temperature=1.0)
    assert images.shape == (1, 3, RESOLUTION, RESOLUTION)
    text_allowed = pipe.sampler._text_allowed(pipe.model.vocab_size)
    image_bpe = list(pipe.tokenizer.chameleon_image_tokens())
    assert len(image_bpe) == N_CODES and not text_allowed[image_bpe].any()
    assert text_allowed[pipe.tokenizer.encode("a red circle")].all()


def test_chameleons_markers_are_retired_so_cm3_and_decoding_get_ids_of_their_own(hf_chameleon,
                                                                               converted):
    from fusion import FusionPipeline

    vocab = json.loads((hf_chameleon / "config.json").read_text())["vocabulary_map"]
    ckpt = HFCheckpoint(hf_chameleon)
    layout = chameleon_layout(ckpt)
    tok = layout.tokenizer
    names = ("<s>", "</s>", "<racm3:break>", "<eoss>")
    theirs = [vocab[name] for name in names]
    assert [tok.id_of(f"<retired:{name}>") for name in names] == theirs  # renamed, same ids
    assert tok.pad_id == vocab["<pad>"]  # Chameleon's own <pad>: nothing to retire
    # fusion's <bos> <eos> <boi> <eoi> take the retired tokens' rows; CM3's <eoss> no longer
    # shares Chameleon's end of an image: an id of its own, a fresh (mean) row
    ours = [tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id]
    assert [layout.row_source[i] for i in ours] == theirs
    assert tok.eoss_id not in theirs and layout.row_source[tok.eoss_id] == -1
    # each retired id ties with its replacement in every logit, so it is never generated
    model = chameleon_model(ckpt, layout).eval()
    ids = [tok.bos_id, *tok.encode("a red circle")]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), layout_from_segments([[(0, "text", len(ids))]]))
    assert torch.equal(logits[..., theirs], logits[..., ours])
    pipe = FusionPipeline.from_pretrained(converted)
    allowed = pipe.sampler._text_allowed(pipe.model.vocab_size)
    assert not allowed[theirs].any() and allowed[tok.eos_id]
    assert set(theirs) <= set(pipe.tokenizer.never_generated_ids())


def fine_tune(converted: Path, out: Path, experiment: str, *extra: str) -> dict:
    """A recipe at tiny scale on the CPU: the converted tiny model's shape, 32-px ShapesWorld,
    a few steps."""
    import subprocess
    import sys

    arch = json.loads((converted / "config.json").read_text())["model"]["arch"]
    overrides = [f"++model.arch.backbone_overrides.{k}={str(v).lower() if v in (True, False) else v}"
                 for k, v in arch["backbone_overrides"].items()]
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", f"experiment={experiment}",
         f"init_from={converted}", f"model.arch.backbone={arch['backbone']}",
         *overrides, "trainer=cpu",
         "trainer.precision=32-true", f"data.image_size={RESOLUTION}", "debug=default", "logger=csv",
         f"output_dir={out}", "sampling.prompts=[a red circle]", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "model" / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("experiment, lora, cm3", [("chameleon_pretrained", False, False),
                                                   ("chameleon_pretrained", False, True),
                                                   ("edit_chameleon_pretrained", False, False),
                                                   ("edit_chameleon_pretrained", True, False)])
def test_fine_tune_recipes_run_from_a_converted_model(converted, tmp_path, experiment, lora,
                                                      cm3):
    from safetensors.torch import load_file

    from fusion import FusionPipeline

    extra = ["lora.rank=4", "optim.lr=1e-3"] if lora else []
    if cm3:  # CM3 on every document: its <eoss> is fusion's own, not Chameleon's <eoi>
        extra += ["model.loss.cm3=true", "model.loss.cm3_rate=1.0"]
    meta = fine_tune(converted, tmp_path / "run", experiment, *extra)
    assert meta["model"]["loss"]["cm3"] is cm3
    assert meta["steps"] == 4 and meta["init_from"] == str(converted)
    assert meta["documents"] == ("edit" if experiment.startswith("edit") else "caption")
    FusionPipeline.from_pretrained(tmp_path / "run" / "model")  # loads (strictly)
    if lora:  # merged: plain weight names; the embedding frozen, the projections moved
        assert meta["lora"]["rank"] == 4
        start = load_file(str(converted / "model.safetensors"))
        tuned = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
        assert not any("lora" in k or "base_layer" in k for k in tuned)
        assert torch.equal(tuned["embed.weight"], start["embed.weight"])
        assert not torch.equal(tuned["transformer.layers.0.attention.wq.weight"],
                               start["transformer.layers.0.attention.wq.weight"])


def test_recipes_refuse_to_start_without_a_converted_model():
    """The recipes take their tokenizers from init_from: without it the run stops with the
    one-line user error that scripts print (fusion.errors.report_user_errors)."""
    from fusion.config import compose
    from fusion.errors import user_error_message

    for experiment in ("chameleon_pretrained", "edit_chameleon_pretrained"):
        cfg = compose("train", [f"experiment={experiment}"])
        with pytest.raises(Exception) as err:
            _ = cfg.data.text_tokenizer
        assert user_error_message(err.value) == ("this recipe needs init_from=...; set it on "
                                                 "the command line")
        cfg = compose("train", [f"experiment={experiment}", "init_from=models/c7b"])
        assert cfg.image_tokenizer == "models/c7b/image_tokenizer"
        assert cfg.model.arch.backbone == "7b" and cfg.trainer.strategy == "fsdp"
