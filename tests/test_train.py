"""scripts/train.py and scripts/sample.py end to end with the debug config (tiny VAE)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_transfusion_train_and_sample(tmp_path, tiny_vae):
    out = tmp_path / "run"
    common = ["scripts/train.py", "experiment=transfusion_tiny", "debug=default",
              f"image_tokenizer={tiny_vae}", f"output_dir={out}", "logger=csv",
              "sampling.diffusion_steps=2", "sampling.prompts=[a photo of a red circle]"]
    # checkpoints every 3 steps; the run ends at step 4, and last.ckpt must hold step 4
    _run(*common, "callbacks.checkpoint_every_n_steps=3")
    model_dir = out / "model"
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["steps"] == 4 and (model_dir / "model.safetensors").exists()
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert list((out / "samples").glob("*.png"))
    # (resuming an interrupted run: tests/test_resume.py)
    # scripts/sample.py is a thin wrapper of run_sampling; run its three tasks in-process
    from fusion.config import compose
    from fusion.jobs.sample import run_sampling

    for task in ("text_to_image", "image_to_text", "text_to_text"):
        cfg = compose("sample", [f"model_dir={model_dir}", f"task={task}",
                                 f"output_dir={tmp_path / 'samples'}", "num_images=2",
                                 "max_new_tokens=3", "sampling.diffusion_steps=2",
                                 "prompts=[a photo of a circle]"])
        assert run_sampling(cfg)["count"] >= 1
        assert (tmp_path / "samples" / f"{task}.jsonl").exists()
    # scripts/evaluate.py model: the main job's evaluation for any saved model
    report = tmp_path / "eval.json"
    # no --steps: the model folder's recorded recipe sampling (diffusion_steps=2) is used
    assert meta["sampling"]["diffusion_steps"] == 2
    kept = tmp_path / "kept"
    _run("scripts/evaluate.py", "model", "--model", str(model_dir), "--images-per-tag", "2",
         "--caption-images", "2", "--no-fid", "--json", str(report), "--keep-images", str(kept))
    scores = json.loads(report.read_text())
    # the scored images, kept in GenEval's layout: one per scored image
    assert len(list(kept.glob("*/samples/*.png"))) == scores["generated_images"] > 0
    assert all((d / "metadata.jsonl").is_file() for d in kept.iterdir())
    # transfusion_tiny's recipe: CFG 5 inside the noise-level interval (0, 0.7]
    assert scores["sampling"]["diffusion_steps"] == 2 and scores["sampling"]["guidance_scale"] == 5
    assert scores["sampling"]["guidance_interval"] == [0.0, 0.7]
    assert scores["model"] == str(model_dir) and scores["caption_images"] == 2
    assert 0.0 <= scores["geneval_overall"] <= 1.0 and "fid_shapes" not in scores


def test_build_rejects_a_mismatched_latent_setting(tiny_vae):
    from fusion.config import compose
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", ["experiment=transfusion_tiny", "model.arch.latent_channels=16"])
    tok = TextTokenizer.from_file(ROOT / "tokenizers/shapes-bpe/tokenizer.json")
    with pytest.raises(ValueError, match="latent_channels=16 but the image tokenizer gives 4"):
        build_family(cfg.model, tok, load_image_tokenizer(str(tiny_vae)), 64)


@pytest.mark.parametrize("family", ["transfusion", "chameleon"])
def test_build_rejects_rows_longer_than_the_model(family, tiny_vae):
    # A bad loss.pack_len fails when the model is built, not at the first training step.
    from fusion.config import compose
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", [f"experiment={family}_tiny", "model.loss.pack_len=4096"])
    tok = TextTokenizer.from_file(ROOT / "tokenizers/shapes-bpe/tokenizer.json")
    image_tok = str(tiny_vae) if family == "transfusion" else cfg.image_tokenizer
    with pytest.raises(ValueError, match="loss.pack_len=4096 must be between 1 and the model's "
                                         "max_seq_len"):
        build_family(cfg.model, tok, load_image_tokenizer(image_tok), 64)


def test_every_experiment_composes():
    from fusion.config import CONF_DIR, compose

    names = [p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")]
    assert {"transfusion_tiny", "chameleon_tiny"} <= set(names)
    for name in names:
        cfg = compose("train", [f"experiment={name}", "debug=default"])
        assert cfg.model.family in ("transfusion", "chameleon")


def test_cosine_clock_ends_the_schedule_at_the_budget(monkeypatch):
    from fusion.training import fusion_module
    from fusion.training.fusion_module import CosineClock

    now = [100.0]
    monkeypatch.setattr(fusion_module.time, "monotonic", lambda: now[0])
    steps_only = CosineClock(warmup=10, min_ratio=0.1)
    assert steps_only.progress(55, 100) is None and not steps_only.expired()
    assert steps_only.multiplier(55, 100) == pytest.approx(0.55)

    clock = CosineClock(warmup=10, min_ratio=0.1, budget_s=60)
    clock.start()
    now[0] += 15  # a quarter of the budget, a ninth of the steps: time leads
    assert clock.progress(20, 100) == pytest.approx(0.25) and not clock.expired()
    assert clock.progress(82, 100) == pytest.approx(0.8)  # steps lead
    assert clock.multiplier(5, 100) == pytest.approx(0.6)  # warm-up is step-based
    now[0] += 45
    assert clock.expired() and clock.multiplier(20, 100) == pytest.approx(0.1)
    resumed = CosineClock(10, 0.1, budget_s=60)
    resumed.load_state_dict(clock.state_dict())  # a checkpoint taken at 60 s
    resumed.start()
    assert resumed.expired()  # the budget is not granted afresh on resume
    with pytest.raises(ValueError, match="time_budget_s must be positive"):
        CosineClock(10, 0.1, budget_s=0)


def test_a_spent_time_budget_stops_family_training_early():
    import lightning as L
    import torch

    from fusion.config import OptimConfig
    from fusion.training.fusion_module import FusionModule

    model = torch.nn.Linear(4, 1)
    batches = torch.utils.data.DataLoader(torch.randn(400, 4), batch_size=8)

    def loss_fn(model, batch, encode, rng, generator=None):
        return {"loss": model(batch).pow(2).mean()}

    module = FusionModule(model, loss_fn, None, OptimConfig(warmup_steps=1, time_budget_s=1e-9),
                          max_steps=50)
    trainer = L.Trainer(max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, batches)
    assert trainer.global_step == 1  # stopped after the first batch, at the cosine's end
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)


def test_cosine_clock_ends_the_schedule_at_a_flops_budget():
    from fusion.training.fusion_module import CosineClock

    clock = CosineClock(warmup=10, min_ratio=0.1, budget_flops=1e12)
    clock.add_flops(2.5e11)  # a quarter of the budget, a ninth of the steps: FLOPs lead
    assert clock.progress(20, 100) == pytest.approx(0.25) and not clock.expired()
    assert clock.progress(82, 100) == pytest.approx(0.8)  # steps lead
    assert clock.progress(20, -1) == pytest.approx(0.25)  # no step limit: FLOPs alone
    clock.add_flops(7.5e11)
    assert clock.expired() and clock.multiplier(20, 100) == pytest.approx(0.1)
    resumed = CosineClock(10, 0.1, budget_flops=1e12)
    resumed.load_state_dict(clock.state_dict())
    assert resumed.flops == 1e12 and resumed.expired()  # not granted afresh on resume
    with pytest.raises(ValueError, match="flops_budget must be positive"):
        CosineClock(10, 0.1, budget_flops=-1.0)


def test_matmul_parameters_skip_lookup_tables_and_count_a_tied_head_once():
    import torch

    from fusion.models.transformer import matmul_parameters

    class Toy(torch.nn.Module):
        def __init__(self, tie: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.proj = torch.nn.Linear(4, 4)  # 20 with its bias
            self.head = torch.nn.Linear(4, 10, bias=False)
            if tie:
                self.head.weight = self.embed.weight

    assert matmul_parameters(Toy(tie=False)) == 20 + 40
    assert matmul_parameters(Toy(tie=True)) == 20 + 40  # the shared table is the head's


def test_a_flops_budget_stops_family_training_where_the_counted_flops_reach_it():
    import lightning as L
    import torch

    from fusion.config import OptimConfig
    from fusion.errors import UserError
    from fusion.training.fusion_module import FusionModule

    model = torch.nn.Linear(4, 1)
    batches = torch.utils.data.DataLoader(torch.randn(400, 4), batch_size=8)

    def loss_fn(model, batch, encode, rng, generator=None):  # 8 positions a step
        return {"loss": model(batch).pow(2).mean(), "positions": torch.tensor(len(batch))}

    # 100 FLOPs a position, 800 a step: a budget of 4,000 ends the run after step 5
    module = FusionModule(model, loss_fn, None, OptimConfig(warmup_steps=1, flops_budget=4000.0),
                          max_steps=50, flops_per_position=100.0)
    trainer = L.Trainer(max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, batches)
    assert trainer.global_step == 5 and module.clock.flops == 4000.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.1)
    with pytest.raises(UserError, match="flops_budget needs the FLOPs"):
        FusionModule(model, loss_fn, None, OptimConfig(flops_budget=1.0), max_steps=5)


def test_family_training_flops_follow_the_shared_transformer_and_row_length():
    from fusion.config import compose
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.families.registry import training_flops_per_position
    from fusion.models.transformer import flops_per_token, matmul_parameters

    cfg = compose("train", ["experiment=transfusion_tiny"])
    tok = TextTokenizer.from_file(ROOT / cfg.data.text_tokenizer)
    model, loss = build_family(cfg.model, tok, load_image_tokenizer(cfg.image_tokenizer),
                               cfg.data.image_size)
    n = matmul_parameters(model)
    assert n == sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    per_position = training_flops_per_position(model, loss)
    assert per_position == flops_per_token(model.transformer.cfg, 64, n)  # rows of 64
    assert training_flops_per_position(model, object()) == 0.0  # outside the FLOP contract


def test_evaluate_takes_unset_sampling_options_from_the_model_recipe():
    import argparse

    import fusion.jobs.evaluate as ev

    recorded = {"sampling": {"guidance_scale": 6.0, "temperature": 0.7, "top_k": 64,
                             "diffusion_steps": 25}}
    args = argparse.Namespace(steps=ev.FROM_MODEL, temperature=0.9, top_k=ev.FROM_MODEL,
                              guidance_scale=ev.FROM_MODEL, seed=3)
    used = ev._resolve_sampling(args, recorded)
    assert (used.diffusion_steps, used.temperature, used.top_k, used.guidance_scale,
            used.seed) == (25, 0.9, 64, 6.0, 3)  # the command line wins over the record
    # a folder saved before models recorded their sampling: the documented fallbacks
    old = argparse.Namespace(steps=ev.FROM_MODEL, temperature=ev.FROM_MODEL,
                             top_k=ev.FROM_MODEL, guidance_scale=None, seed=0)  # 'none' = off
    assert ev._used(old, ev._resolve_sampling(old, {})) == {
        "diffusion_steps": 25, "temperature": 1.0, "top_k": None, "guidance_scale": None}


def test_evaluate_pools_several_prompt_sets():
    import argparse

    import fusion.jobs.evaluate as ev
    a = {"geneval_overall": 0.2, "geneval_colors": {"score": 0.3, "correct": 30, "images": 100},
         "fid_shapes": 5.0, "generated_images": 665, "caption_examples": ["a"]}
    b = {"geneval_overall": 0.4, "geneval_colors": {"score": 0.45, "correct": 45, "images": 100},
         "fid_shapes": 7.0, "generated_images": 665, "caption_examples": ["b"]}
    pooled = ev.pool_prompt_sets([a, b])
    assert pooled["geneval_colors"] == {"score": 0.375, "correct": 75, "images": 200}
    assert pooled["geneval_overall"] == pytest.approx(0.3)
    assert pooled["fid_shapes"] == pytest.approx(6.0)
    assert pooled["generated_images"] == 1330 and pooled["caption_examples"] == ["a"]
    assert ev.pool_prompt_sets([a]) is a
    with pytest.raises(ValueError, match="--world-seed or --world-seeds"):
        ev.cmd_model(argparse.Namespace(model="unused", image_tokenizer=None, world_seed=1,
                                        world_seeds=[0, 1], device="cpu", **_FROM_MODEL(ev)))


def test_evaluate_guidance_interval_option():
    import argparse

    import fusion.jobs.evaluate as ev

    for given, expected in ((["0.1", "0.7"], [0.1, 0.7]), (["none"], [0.0, 1.0])):
        args = argparse.Namespace(guidance_interval=given, seed=0)
        assert ev._resolve_sampling(args, {}).guidance_interval == expected
    assert ev._resolve_sampling(argparse.Namespace(guidance_interval=ev.FROM_MODEL, seed=0),
                                {}).guidance_interval is None  # the model's own interval
    for bad, message in ((["0.7", "0.1"], "guidance_interval must be"),
                         (["low", "high"], "takes LO HI or 'none'")):
        with pytest.raises(ValueError, match=message):
            ev.parse_guidance_interval(bad)


def test_a_chameleon_sampler_refuses_a_guidance_interval():
    from fusion.errors import UserError
    from fusion.models.chameleon import Chameleon
    from fusion.models.packing import SpecialIds
    from fusion.models.schemas import ChameleonConfig
    from fusion.sampling.chameleon import ChameleonSampler

    model = Chameleon(ChameleonConfig(backbone_overrides=dict(
        d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32, multiple_of=32)),
        20, 8, 4)
    sampler = ChameleonSampler(model, SpecialIds(0, 1, 2, 3, 4), (2, 2))
    with pytest.raises(UserError, match="Transfusion models only"):
        sampler.generate_images([[7]], guidance_interval=[0.0, 0.7])


def _FROM_MODEL(ev) -> dict:
    return {name: ev.FROM_MODEL for name in ev.SAMPLING_OPTIONS}


def test_a_model_refuses_a_retrained_image_tokenizer_at_its_recorded_path(tmp_path, tiny_vae):
    import json as _json
    import shutil

    from fusion.config import compose
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer
    from fusion.families.folders import image_tokenizer_fingerprint, load_model, save_model
    from fusion.image.vae import VAETokenizer, build_autoencoder

    art, original = tmp_path / "vae", tmp_path / "vae-original"
    shutil.copytree(tiny_vae, art)
    shutil.copytree(tiny_vae, original)
    cfg = compose("train", ["experiment=transfusion_tiny"])
    tok_path = str(ROOT / "tokenizers/shapes-bpe/tokenizer.json")
    model, _ = build_family(cfg.model, TextTokenizer.from_file(tok_path),
                            load_image_tokenizer(str(art)), 64)
    save_model(tmp_path / "model", model, cfg.model, tok_path, str(art), {"image_size": 64})
    load_model(tmp_path / "model")  # the artifact it was trained with: fine

    # re-scoring an artifact (a new "info") keeps its fingerprint
    before = image_tokenizer_fingerprint(art)
    conf = _json.loads((art / "config.json").read_text())
    conf["info"] = {"heldout": {"psnr": 1.0}}
    (art / "config.json").write_text(_json.dumps(conf))
    assert image_tokenizer_fingerprint(art) == before
    load_model(tmp_path / "model")

    # retraining it at the same path does not: the folder loads its own copy
    # (image_tokenizer/), and a folder saved before copies fails, naming the way out
    VAETokenizer(build_autoencoder((16, 16, 16, 16), 1, 4, 8, False)).save_pretrained(art)
    load_model(tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "image_tokenizer")
    with pytest.raises(ValueError, match="holds a different artifact.*--image-tokenizer"):
        load_model(tmp_path / "model")
    load_model(tmp_path / "model", image_tokenizer=str(original))  # a copy of the original


def _small_models():
    from fusion.models.chameleon import Chameleon
    from fusion.models.schemas import ChameleonConfig, TransfusionConfig
    from fusion.models.transfusion import Transfusion

    small = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64, multiple_of=16)
    chameleon = Chameleon(ChameleonConfig(backbone_overrides=small, image_pos_embed=True,
                                          source_alignment=True, source_copy=True),
                          24, 16, 4, (2, 2))
    transfusion = Transfusion(TransfusionConfig(
        backbone_overrides=small, patchifier="unet", patch_size=2, latent_channels=4,
        latent_size=8, tie_embeddings=True,
        patchifier_args=dict(block_out_channels=(16, 32), layers_per_block=1,
                             norm_num_groups=8)), 24)
    return {"chameleon": chameleon, "transfusion": transfusion}


@pytest.mark.parametrize("family", ["chameleon", "transfusion"])
def test_weight_decay_reaches_layer_weights_only(family):
    """Decayed: linear and convolution weights. Not: norms (QK-norm's (H, 1, Dh) gains
    included), biases, embeddings (a tied LM head too), position tables. An AdamW step with
    zero gradients then shrinks exactly the decayed tensors."""
    from torch import nn

    from fusion.training.fusion_module import weight_decay_groups

    model = _small_models()[family]
    decay, keep = weight_decay_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    kept = {id(p) for p in keep["params"]}
    assert not decayed & kept
    assert decayed | kept == {id(p) for p in model.parameters()}  # every parameter, once
    names = {id(p): n for n, p in model.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}"
            layer = isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight"
            assert (id(p) in decayed) == (layer and id(p) not in embeddings), full
    kept_names = [names[i] for i in kept]
    if family == "chameleon":  # QK-norm, 2-D cell positions, the copy gate's bias
        assert any("q_norm.weight" in n for n in kept_names)
        assert any("k_norm.bias" in n for n in kept_names)
        assert any("image_pos" in n for n in kept_names)
    else:  # tied: the LM head is the embedding table, not decayed
        assert model.lm_head.weight is model.embed.weight and id(model.embed.weight) in kept
        assert any("norm" in n and "patchifier" in n for n in kept_names)  # GroupNorm
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([decay, keep], lr=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        shrunk = not torch.equal(p, before[n])
        assert shrunk == (id(p) in decayed and bool(before[n].any())), n
