"""Token-sampling settings (temperature / top-k / top-p) reach ``generate_images`` from every
family-agnostic entry point: scripts/sample.py and the model evaluation."""

from types import SimpleNamespace

import torch

from fusion.config import SamplingConfig, compose
from fusion.sampling.text import TokenSampling


class RecordingSampler:
    """Records the ``sampling`` of every generate_images call; returns grey images."""

    def __init__(self):
        self.seen = []

    def generate_images(self, prompts, guidance_scale=None, steps=None, seed=0,
                        progress=False, sampling=None, guidance_interval=None):
        self.seen.append(sampling)
        return torch.zeros(len(prompts), 3, 32, 32)

    def caption(self, images, max_new_tokens=24, sampling=None, seed=0):
        return [[] for _ in images]


TOK = SimpleNamespace(encode=lambda text: [5, 6], decode=lambda ids: "")


def _model_folder(monkeypatch, sampler, meta):
    """What run_sampling loads: a FusionPipeline around ``sampler``, no model folder read."""
    from fusion.api import FusionPipeline

    pipe = FusionPipeline.__new__(FusionPipeline)
    pipe.sampler, pipe.tokenizer, pipe.meta = sampler, TOK, meta
    monkeypatch.setattr(FusionPipeline, "from_pretrained", lambda *a, **k: pipe)


def test_evaluate_model_passes_its_token_sampling():
    from fusion.eval.model import ModelEvalConfig, evaluate_model

    # the defaults are what Chameleon's sampler drew with before these fields existed
    assert TokenSampling.from_config(ModelEvalConfig().sampling) == TokenSampling(temperature=1.0)
    sampler = RecordingSampler()
    cfg = ModelEvalConfig(images_per_tag=1, caption_images=1, fid=False,
                          sampling=SamplingConfig(temperature=0.7, top_k=64, top_p=0.9))
    evaluate_model(sampler, TOK, 32, cfg, progress=False)
    assert sampler.seen and all(s == TokenSampling(0.7, 64, 0.9) for s in sampler.seen)


def test_sample_script_passes_its_token_sampling(monkeypatch, tmp_path):
    import fusion.jobs.sample as run

    sampler = RecordingSampler()
    _model_folder(monkeypatch, sampler, {})
    cfg = compose("sample", [f"output_dir={tmp_path}", "device=cpu", "prompts=[a,b,c]",
                             "batch_size=2", "sampling.top_k=64", "sampling.temperature=0.5"])
    run.run_sampling(cfg)
    assert sampler.seen == [TokenSampling(0.5, 64, None)] * 2


def test_sample_script_follows_the_models_recorded_recipe_unless_told_otherwise(monkeypatch,
                                                                                tmp_path):
    import fusion.jobs.sample as run
    from fusion.families.folders import model_sampling

    sampler = RecordingSampler()
    meta = {"sampling": {"top_k": 64, "temperature": 0.7, "guidance_scale": 6.0}}
    _model_folder(monkeypatch, sampler, meta)
    cfg = compose("sample", [f"output_dir={tmp_path}", "device=cpu", "prompts=[a]",
                             "sampling.temperature=0.5"])
    run.run_sampling(cfg, explicit_sampling=["temperature"])
    assert sampler.seen == [TokenSampling(0.5, 64, None)]  # top-k from the model
    settings, taken = model_sampling(cfg.sampling, meta, ["temperature"])
    assert taken == {"top_k": 64, "guidance_scale": 6.0} and settings.guidance_scale == 6.0
