"""Mismatched or damaged parts fail early with a UserError that names both sides and the fix
(issue #29): the image tokenizer of the other family, a model folder's config.json without a
required key, a text tokenizer replaced at its recorded path, and corrupt weights; user
errors in the scripts print one ``error:`` line and exit with status 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BPE = "tokenizers/shapes-bpe/tokenizer.json"
# A one-layer backbone: these tests check files and messages, not what the model computes.
SMALL = ["+model.arch.backbone_overrides.d_model=32", "+model.arch.backbone_overrides.n_layers=1",
         "+model.arch.backbone_overrides.n_heads=2", "+model.arch.backbone_overrides.n_kv_heads=1"]


def _model_and_cfg(family="transfusion", image_tokenizer=None):
    from fusion.config import compose, resolve_path
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", [f"experiment={family}_tiny", *SMALL])
    tok = TextTokenizer.from_file(resolve_path(BPE))
    image_tok = load_image_tokenizer(image_tokenizer or cfg.image_tokenizer)
    return build_family(cfg.model, tok, image_tok, 64)[0], cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved (untrained) small Transfusion model folder; tests copy it before damaging it."""
    from fusion.families.folders import save_model

    model, cfg = _model_and_cfg()
    out = tmp_path_factory.mktemp("saved") / "model"
    save_model(out, model, cfg.model, BPE, cfg.image_tokenizer, {"image_size": 64})
    return out


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(saved, dst)
    return dst


# --------------------------------------------------------------------------------------------
# The image tokenizer of the other family
# --------------------------------------------------------------------------------------------
def test_chameleon_refuses_a_vae_naming_both_and_what_to_pass():
    with pytest.raises(UserError, match=(
            r"the chameleon family needs a VQ-GAN image tokenizer \(discrete codes\), but "
            r"image_tokenizer=tokenizers/shapes-vae is a VAE; pass "
            r"image_tokenizer=tokenizers/shapes-vqgan")):
        _model_and_cfg("chameleon", "tokenizers/shapes-vae")


def test_transfusion_refuses_a_vqgan_naming_both_and_what_to_pass():
    with pytest.raises(UserError, match=(
            r"the transfusion family needs a VAE image tokenizer \(continuous latents\), but "
            r"image_tokenizer=tokenizers/shapes-vqgan is a VQ-GAN; pass "
            r"image_tokenizer=tokenizers/shapes-vae")):
        _model_and_cfg("transfusion", "tokenizers/shapes-vqgan")


def test_each_family_still_builds_with_its_own_tokenizer():
    for family in ("transfusion", "chameleon"):
        model, _ = _model_and_cfg(family)
        assert model.max_seq_len == 256


# --------------------------------------------------------------------------------------------
# Model folders: config.json keys, the text tokenizer's fingerprint
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["model", "text_tokenizer", "image_tokenizer", "image_size"])
def test_a_config_without_a_required_key_names_the_file_and_the_key(copy, key):
    from fusion.families.folders import load_model

    meta = json.loads((copy / "config.json").read_text())
    del meta[key]
    (copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"{copy / 'config.json'} lacks the key\(s\) '{key}'"):
        load_model(copy)


def test_a_config_that_is_not_json_is_a_user_error(copy):
    from fusion.families.folders import load_model

    (copy / "config.json").write_text("{oops")
    with pytest.raises(UserError, match=r"config\.json is not valid JSON"):
        load_model(copy)


def test_a_text_tokenizer_replaced_at_its_recorded_path_is_refused(tmp_path, tokenizer):
    from fusion.config import resolve_path
    from fusion.families.folders import load_model, save_model

    tok_file = tmp_path / "bpe" / "tokenizer.json"
    tok_file.parent.mkdir()
    shutil.copy(resolve_path(BPE), tok_file)
    model, cfg = _model_and_cfg()
    save_model(tmp_path / "model", model, cfg.model, str(tok_file), cfg.image_tokenizer,
               {"image_size": 64})
    load_model(tmp_path / "model")  # the tokenizer it was saved with: fine

    # the folder's own copy is what it loads; another vocabulary there is refused
    copy = tmp_path / "model" / "tokenizer.json"
    saved_copy = copy.read_bytes()
    tokenizer.save(copy)
    with pytest.raises(UserError, match=(
            rf"but {copy} now holds a different one \({tokenizer.vocab_size} tokens")):
        load_model(tmp_path / "model")
    copy.write_bytes(saved_copy)
    load_model(tmp_path / "model")

    # a folder without its copy (saved before copies) checks the recorded path
    copy.unlink()
    tokenizer.save(tok_file)  # another vocabulary at the same path
    with pytest.raises(UserError, match=(
            rf"trained with the text tokenizer {tok_file} \(vocabulary sha256 \w+\.\.\.\), but "
            rf"that path now holds a different one \({tokenizer.vocab_size} tokens")):
        load_model(tmp_path / "model")


def test_a_mismatched_image_tokenizer_is_a_user_error(copy, tmp_path):
    import re

    from fusion.families.folders import load_model

    meta = json.loads((copy / "config.json").read_text())
    meta["image_tokenizer_sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(meta))
    # the folder's own copy (image_tokenizer/) is what it loads; another artifact there
    with pytest.raises(UserError, match=(
            rf"{re.escape(str(copy / 'image_tokenizer'))}, this model folder's copy of its image "
            r"tokenizer tokenizers/shapes-vae, does not match the sha256 recorded in .*config\.json "
            r"\(000000000000\.\.\.\): the copy is damaged or was replaced")):
        load_model(copy)
    # a folder without its copy (saved before copies) checks the recorded path
    shutil.rmtree(copy / "image_tokenizer")
    with pytest.raises(UserError, match=(
            r"trained with the image tokenizer tokenizers/shapes-vae \(sha256 000000000000\.\.\.\)"
            r", but tokenizers/shapes-vae holds a different artifact")):
        load_model(copy)


# --------------------------------------------------------------------------------------------
# Integrity of model.safetensors
# --------------------------------------------------------------------------------------------
def _flip_middle_bytes(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_save_model_records_the_weights_sha256(saved):
    from fusion.families.folders import file_sha256

    meta = json.loads((saved / "config.json").read_text())
    assert meta["weights_sha256"] == file_sha256(saved / "model.safetensors")
    # no temporary file left behind; the model card is written last
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json",
                                                       "image_tokenizer", "model.safetensors",
                                                       "tokenizer.json"]


def test_corrupt_weights_are_refused_naming_the_file(copy):
    from fusion.families.folders import load_model
    from fusion.training.init_from import InitFromError, read_init_weights

    load_model(copy)  # untouched: loads
    read_init_weights(copy)
    _flip_middle_bytes(copy / "model.safetensors")
    weights = copy / "model.safetensors"
    expected = (rf"{weights} does not match the sha256 recorded in {copy / 'config.json'} "
                r"\(file corrupt or replaced\?\)")
    with pytest.raises(UserError, match=expected):
        load_model(copy)
    with pytest.raises(InitFromError, match=expected):
        read_init_weights(copy)
    with pytest.raises(InitFromError, match=expected):
        read_init_weights(weights)


def test_a_folder_saved_before_the_sha256_was_recorded_loads_unchecked(copy):
    from fusion.families.folders import load_model

    meta = json.loads((copy / "config.json").read_text())
    del meta["weights_sha256"]
    (copy / "config.json").write_text(json.dumps(meta))
    load_model(copy)


def test_a_crash_while_saving_leaves_no_config_pointing_at_partial_weights(copy, monkeypatch):
    import safetensors.torch

    from fusion.families.folders import load_model, save_model

    model, cfg = _model_and_cfg()

    def crash(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(copy, model, cfg.model, BPE, cfg.image_tokenizer, {"image_size": 64})
    # the old weights stay, no temporary file is left, and the folder no longer loads
    assert sorted(p.name for p in copy.iterdir()) == ["image_tokenizer", "model.safetensors",
                                                      "tokenizer.json"]
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(copy)


def test_a_crash_while_copying_the_image_tokenizer_leaves_no_partial_copy(copy, monkeypatch):
    from fusion.families.folders import image_tokenizer_fingerprint, load_model, save_model

    model, cfg = _model_and_cfg()
    before = image_tokenizer_fingerprint(copy / "image_tokenizer")
    real_copyfile, copied = shutil.copyfile, []

    def crash(src, dst, *args, **kwargs):
        if copied:  # the second file of the artifact
            raise KeyboardInterrupt
        copied.append(dst)
        return real_copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(copy, model, cfg.model, BPE, cfg.image_tokenizer, {"image_size": 64})
    # the previous copy stays whole, no temporary folder is left, and no config.json
    assert sorted(p.name for p in copy.iterdir()) == ["image_tokenizer", "model.safetensors",
                                                      "tokenizer.json"]
    assert image_tokenizer_fingerprint(copy / "image_tokenizer") == before
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(copy)
    monkeypatch.undo()
    save_model(copy, model, cfg.model, BPE, cfg.image_tokenizer, {"image_size": 64})
    load_model(copy)


# --------------------------------------------------------------------------------------------
# Scripts: one `error:` line and status 2; the traceback with FUSION_DEBUG=1
# --------------------------------------------------------------------------------------------
def _script(*args, env=None):
    env = {**os.environ, "HYDRA_FULL_ERROR": "", "FUSION_DEBUG": "", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_sample_script_reports_a_missing_model_folder_in_one_line(tmp_path):
    proc = _script("scripts/sample.py", f"model_dir={tmp_path}/nonexistent",
                   f"output_dir={tmp_path}/out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model folder {tmp_path}/nonexistent has no config.json"]

    debug = _script("scripts/sample.py", f"model_dir={tmp_path}/nonexistent",
                    f"output_dir={tmp_path}/out", env={"FUSION_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "FileNotFoundError: model folder" in debug.stderr


def test_edit_script_reports_a_wrong_model_folder_in_one_line(copy, tmp_path):
    _flip_middle_bytes(copy / "model.safetensors")
    proc = _script("scripts/edit.py", f"model_dir={copy}", "image=x.png", "instruction=blue",
                   f"output_dir={tmp_path}/out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {copy / 'model.safetensors'} does not match the sha256")


def test_evaluate_script_reports_user_errors_with_status_2(copy, capsys, monkeypatch):
    import runpy

    main = runpy.run_path(str(ROOT / "scripts" / "evaluate.py"))["main"]
    monkeypatch.delenv("FUSION_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (copy / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        main(["model", "--model", str(copy), "--no-fid"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copy / 'config.json'} lacks the key(s)") and \
        err.count("\n") == 1
