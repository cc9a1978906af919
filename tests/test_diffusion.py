"""The diffusion objectives: noising, targets, and samplers that invert them with an oracle."""

import pytest
import torch

from fusion.models.diffusion import Diffusion, DiffusionConfig


def oracle(diff: Diffusion, x: torch.Tensor, x0: torch.Tensor, tt: torch.Tensor):
    """The exact model output at x_t = x for clean data x0: ε (ddpm), or the velocity that
    points from x_t back to x0 (flow)."""
    if diff.cfg.objective == "ddpm":
        abar = diff.ddpm.alphas_cumprod[tt.long()].view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return (x - x0) / (tt / diff.T).view(-1, 1, 1, 1)


def sample_with_oracle(objective: str, steps: int, wrong: bool = False):
    """Sample 3 latents with the oracle as the model -> (sample, x0). ``wrong``: the oracle's
    output is bounded like a network's (clamped to ±5) and off by 5 % noise."""
    diff = Diffusion(DiffusionConfig(objective=objective))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    x = torch.randn(3, 4, 8, 8, generator=g)
    sampler = diff.sampler(steps=steps)
    for t in sampler.timesteps:
        out = oracle(diff, x, x0, diff.model_timestep(t, 3, "cpu"))
        if wrong:
            out = out.clamp(-5, 5) + 0.05 * torch.randn(out.shape, generator=g)
        x = sampler.step(out, t, x).prev_sample
    return x, x0


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_oracle_model_is_sampled_back_to_the_data(objective):
    """With a model that answers exactly (it knows x0), the sampler must land on x0."""
    x, x0 = sample_with_oracle(objective, steps=10)
    assert torch.allclose(x, x0, atol=1e-3), (x - x0).abs().max()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_slightly_wrong_model_still_lands_near_the_data(objective):
    """A real model is never exact, and its outputs stay in the range it was trained on. An
    oracle off by 5 % noise, its output bounded like a network's, must still sample close to
    x0: with DDIM's "trailing" spacing the first ε-step at ᾱ(999) ≈ 2e-9 amplifies the error
    ~10⁴-fold, x_t leaves the training range and the sample is lost (what our first models
    showed)."""
    x, x0 = sample_with_oracle(objective, steps=25, wrong=True)
    assert (x - x0).abs().mean() < 0.1, (x - x0).abs().mean()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_noising_and_target(objective):
    diff = Diffusion(DiffusionConfig(objective=objective))
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 250, 500, 999])
    xt = diff.add_noise(x0, noise, t)
    assert torch.allclose(xt[0], x0[0], atol=0.05)  # t = 0 is (nearly) clean
    # noise grows with t: the correlation with x0 falls
    corr = [torch.corrcoef(torch.stack([xt[i].flatten(), x0[i].flatten()]))[0, 1] for i in
            range(4)]
    assert corr[0] > corr[1] > corr[2] > corr[3]
    assert torch.allclose(diff.predict_x0(xt, diff.target(x0, noise), t)[:3], x0[:3], atol=1e-3)
    target = diff.target(x0, noise)
    assert torch.equal(target, noise if objective == "ddpm" else noise - x0)


def test_cosine_schedule_and_timestep_limit():
    diff = Diffusion()
    assert diff.ddpm.config.beta_schedule == "squaredcos_cap_v2"
    assert diff.ddpm.config.num_train_timesteps == 1000
    t = diff.sample_timesteps(2000, max_t=torch.full((2000,), 500))
    assert t.max() < 500 and t.min() >= 0
    t = diff.sample_timesteps(2000)
    assert t.max() > 900 and t.dtype == torch.long
    with pytest.raises(ValueError, match="unknown diffusion objective 'score'"):
        Diffusion(DiffusionConfig(objective="score"))


def test_logit_normal_timesteps_concentrate_on_middle_noise_levels():
    """SD3's logit-normal sampling: P(t/T in [0.25, 0.75)) = P(|N(0,1)| < logit(0.75) = 1.0986)
    = 0.728 at std 1, against 0.5 for uniform; the mean shifts with logit_mean; max_t holds."""
    g = torch.Generator().manual_seed(0)
    uniform = Diffusion(DiffusionConfig(objective="flow"))
    logit = Diffusion(DiffusionConfig(objective="flow", timestep_sampling="logit_normal"))
    middle = lambda t: ((t >= 250) & (t < 750)).float().mean().item()
    assert abs(middle(uniform.sample_timesteps(20000, generator=g)) - 0.5) < 0.02
    t = logit.sample_timesteps(20000, generator=g)
    assert abs(middle(t) - 0.728) < 0.02 and t.min() >= 0 and t.max() <= 999
    shifted = Diffusion(DiffusionConfig(objective="flow", timestep_sampling="logit_normal",
                                        logit_mean=1.0))
    assert shifted.sample_timesteps(20000, generator=g).float().mean() > t.float().mean() + 100
    capped = logit.sample_timesteps(2000, max_t=torch.full((2000,), 500), generator=g)
    assert capped.max() < 500
    with pytest.raises(ValueError, match="unknown timestep_sampling 'beta'"):
        Diffusion(DiffusionConfig(timestep_sampling="beta"))
    with pytest.raises(ValueError, match="logit_std must be > 0"):
        Diffusion(DiffusionConfig(timestep_sampling="logit_normal", logit_std=0.0))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_bf16_latents_get_the_scheduled_noise_under_autocast(objective):
    """The frozen VAE returns bf16 latents under bf16 autocast. The noised latents must still
    be x_t = a_t·x0 + b_t·ε with the schedule's float32 a_t, b_t at every t (in bf16,
    1 - ᾱ_t rounds to 0 for t <= 20 and σ(998) = σ(999) = 1)."""
    diff = Diffusion(DiffusionConfig(objective=objective))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1000, 4, 4, 4, generator=g).bfloat16()
    eps = torch.randn(1000, 4, 4, 4, generator=g)
    t = torch.arange(1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xt = diff.add_noise(x0, eps, t)
        target = diff.target(x0, eps)
    assert xt.dtype == torch.float32 and target.dtype == torch.float32
    if objective == "ddpm":
        abar = diff.ddpm.alphas_cumprod.double()
        a, b = abar.sqrt(), (1 - abar).sqrt()
    else:
        b = t.double() / 1000
        a = 1 - b
    expected = a.view(-1, 1, 1, 1) * x0.double() + b.view(-1, 1, 1, 1) * eps.double()
    assert torch.allclose(xt.double(), expected, atol=1e-5)
    # the noise each image carries has the scheduled std, small t included
    residual = (xt.double() - a.view(-1, 1, 1, 1) * x0.double()).flatten(1).std(1)
    for step in (1, 10, 20, 500, 998, 999):
        assert abs(residual[step] / b[step] - 1) < 0.3, (step, residual[step], b[step])
    assert torch.equal(target, eps if objective == "ddpm" else eps - x0.float())
