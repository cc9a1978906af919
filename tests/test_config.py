"""Configs compose, typos fail at compose time naming the key, builders honour the configs."""

import os
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fusion.config import CONF_DIR, UnknownConfigKeyError, compose
from fusion.training.factory import build_logger, build_trainer


def test_demo_composes_with_every_trainer_and_logger():
    for trainer in ("cpu", "gpu", "ddp", "fsdp"):
        for logger in ("wandb", "csv", "none"):
            cfg = compose("demo", [f"trainer={trainer}", f"logger={logger}"])
            assert cfg.logger.kind == logger
    assert compose("demo", ["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert compose("demo", ["trainer=fsdp"]).trainer.strategy == "fsdp"
    assert compose("demo").logger.mode == "offline"


def test_misspelt_override_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.max_stpes"):
        compose("demo", ["trainer.max_stpes=3"])
    # "+key=value" forces a key in, past Hydra's own check; ours still names it
    with pytest.raises(UnknownConfigKeyError, match="'trainer.max_stpes'.*TrainerConfig"):
        compose("demo", ["+trainer.max_stpes=3"])


def test_misspelt_key_in_a_yaml_file_fails_naming_it(tmp_path):
    bad = CONF_DIR / "data" / "_typo_test.yaml"
    bad.write_text("source: shapes\nbatch_sise: 4\n")
    try:
        with pytest.raises(Exception) as err:
            compose("demo", ["data=_typo_test"])
        assert "batch_sise" in str(err.value) + str(err.value.__cause__)
    finally:
        bad.unlink()


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException):
        compose("demo", ["data.batch_size=lots"])


def test_debug_makes_runs_tiny():
    cfg = compose("demo", ["debug=default"])
    assert cfg.trainer.max_steps <= 10 and cfg.data.num_train <= 100


def test_experiment_files_are_global_packages():
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_"), path


def test_wandb_logger_is_offline_and_never_prompts(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    cfg = compose("demo", ["logger=wandb"]).logger
    logger = build_logger(cfg, tmp_path)
    assert os.environ["WANDB_MODE"] == "offline"
    logger.log_metrics({"x": 1.0}, step=0)  # starts the run: must not prompt or connect
    logger.experiment.finish()
    assert list(Path(tmp_path).rglob("offline-run-*")), "no offline run written"


def test_logger_none_and_csv(tmp_path):
    assert build_logger(compose("demo", ["logger=none"]).logger, tmp_path) is False
    csv = build_logger(compose("demo", ["logger=csv"]).logger, tmp_path)
    assert type(csv).__name__ == "CSVLogger"
    bad = OmegaConf.create({"kind": "tensorboardx", "mode": "offline"})
    with pytest.raises(ValueError, match="unknown logger kind 'tensorboardx'"):
        build_logger(bad, tmp_path)


def test_trainer_builds_from_config(tmp_path):
    cfg = compose("demo", ["debug=default"])
    trainer = build_trainer(cfg.trainer, logger=False, callbacks=[], default_root_dir=tmp_path)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # lightning vs torch 2.13 (factory.py)
def test_logger_none_with_lr_monitor_trains(tmp_path, caplog):
    """logger=none + callbacks.lr_monitor=true: the monitor (which needs a logger) is left
    out with a log line instead of failing at fit start."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.demos.boring_classes import BoringModel

    from fusion.training.factory import build_callbacks

    cfg = compose("demo", ["debug=default", "logger=none", "callbacks.lr_monitor=true",
                           "callbacks.progress_bar=none", "trainer.max_steps=1"])
    logger = build_logger(cfg.logger, tmp_path)
    callbacks = build_callbacks(cfg.callbacks, tmp_path / "checkpoints")
    assert any(isinstance(c, LearningRateMonitor) for c in callbacks)
    with caplog.at_level("INFO", logger="fusion.training.factory"):
        trainer = build_trainer(cfg.trainer, logger, callbacks, default_root_dir=tmp_path)
    assert "learning-rate monitor is left out" in caplog.text
    assert not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    trainer.fit(BoringModel())  # raised MisconfigurationException before the fix
    assert trainer.global_step == 1


def test_both_stages_share_one_optimiser_schema_with_their_own_defaults():
    """fusion.config.AdamWConfig is the optimiser of both stages (wall-clock budget included);
    the YAML keys are unchanged and each stage keeps its defaults (stage 1: beta2 0.99, no decay; stage 2: 0.95, 0.1)."""
    from fusion.config import AdamWConfig, OptimConfig
    from fusion.image.schemas import TokenizerOptimConfig

    assert issubclass(OptimConfig, AdamWConfig) and issubclass(TokenizerOptimConfig, AdamWConfig)
    vq = compose("train_tokenizer", ["tokenizer=vqgan_tiny"]).tokenizer.optim
    assert OmegaConf.to_container(vq) == dict(
        lr=2.0e-3, weight_decay=0.0, beta1=0.9, beta2=0.99, warmup_steps=50, min_lr_ratio=0.05,
        grad_clip=1.0, time_budget_s=840.0)
    vae = compose("train_tokenizer", ["tokenizer=vae_tiny"]).tokenizer.optim
    assert (vae.lr, vae.warmup_steps, vae.min_lr_ratio, vae.time_budget_s) == (
        1.0e-3, 50, 0.05, None)
    fam = compose("train", ["experiment=chameleon_tiny"]).optim
    assert OmegaConf.to_container(fam) == dict(
        lr=1.0e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, warmup_steps=200, min_lr_ratio=0.1,
        time_budget_s=None, ema_decay=None, flops_budget=None, max_nonfinite_steps=3)
    # the edit fine-tunes end their cosine at the 19-20 minutes (shared clock)
    for family in ("transfusion", "chameleon"):
        assert compose("train", [f"experiment=edit_{family}_tiny"]).optim.time_budget_s == 1140
    with pytest.raises(ConfigCompositionException):  # stage 2 clips through the Trainer
        compose("train", ["experiment=chameleon_tiny", "optim.grad_clip=1.0"])


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_takes_bf16_only_where_the_hardware_runs_it(native, monkeypatch, caplog):
    """The tiny recipes ask for ``auto``: bf16-mixed on a CPU with AVX-512 BF16 / AMX (or a
    bf16 GPU), 32-true where bf16 would be emulated. An explicit bf16-mixed is kept, with a
    warning on a CPU that would emulate it."""
    import fusion.training.factory as factory

    monkeypatch.setattr(factory, "native_bf16", lambda accelerator: native)
    for experiment in ("transfusion_tiny", "chameleon_tiny", "edit_transfusion_tiny",
                       "edit_chameleon_tiny"):
        assert compose("train", [f"experiment={experiment}"]).trainer.precision == "auto"
    assert factory.resolve_precision("auto") == ("bf16-mixed" if native else "32-true")
    assert factory.resolve_precision("32-true") == "32-true"
    with caplog.at_level("WARNING", logger="fusion.training.factory"):
        assert factory.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert ("without native bf16" in caplog.text) == (not native)
    trainer = build_trainer(compose("train", ["experiment=transfusion_tiny", "logger=none"]).trainer,
                            False, [], "/tmp")
    assert trainer.precision == ("bf16-mixed" if native else "32-true")
