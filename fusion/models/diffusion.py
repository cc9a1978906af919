"""Diffusion objectives and samplers for image positions (Transfusion family).

Two parameterisations behind one interface, both on diffusers' schedulers:

* ``ddpm`` -- the Transfusion paper's choice (Zhou et al. 2024, arXiv:2408.11039, sec. 3):
  a 1,000-step DDPM with the cosine schedule (Nichol & Dhariwal 2021), the model predicts the
  noise ε and the loss is ``||ε - ε_θ(x_t, t)||²``; noising through
  ``DDPMScheduler.add_noise``; sampling with DDIM.
* ``flow`` -- rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022):
  ``x_t = (1 - σ) x_0 + σ ε`` with σ = t / 1000, the model predicts the velocity ``ε - x_0``;
  sampling with diffusers' ``FlowMatchEulerDiscreteScheduler``.

Either way the model is conditioned on an integer-valued timestep t in [0, 1000), so the
patchifier's timestep embedding is shared by both.

Shape legend: B = images, C = latent channels, h, w = latent grid.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fusion.models.schemas import OBJECTIVES, TIMESTEP_SAMPLINGS, DiffusionConfig


def check_guidance_interval(interval) -> None:
    """``interval``: None or [lo, hi] with 0 <= lo < hi <= 1 (noise levels t/T)."""
    if interval is None:
        return
    if len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1:
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo < hi <= 1 "
                         f"(noise levels t/T), got {list(interval)}")


class Diffusion:
    """Noise, targets and sampling steps for one objective. Holds no parameters."""

    def __init__(self, cfg: DiffusionConfig | None = None):
        self.cfg = cfg = cfg or DiffusionConfig()
        if cfg.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown diffusion objective {cfg.objective!r}; expected one of {OBJECTIVES}"
            )
        if cfg.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}; expected "
                             f"one of {TIMESTEP_SAMPLINGS}")
        if cfg.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {cfg.logit_std}")
        check_guidance_interval(cfg.guidance_interval)
        self.T = cfg.num_train_timesteps
        # clip_sample=False: latents are scaled to unit variance, not bounded to [-1, 1].
        self.ddpm = DDPMScheduler(
            num_train_timesteps=self.T, beta_schedule=cfg.beta_schedule, clip_sample=False
        )

    # -- training -------------------------------------------------------------------------
    def sample_timesteps(
        self,
        n: int,
        max_t: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Integer timesteps in [0, max_t) (default max_t = T), one per image: (n,).

        ``timestep_sampling``: uniform, or logit-normal (the share u = t / max_t is
        sigmoid(N(logit_mean, logit_std²))); ``max_t`` scales either, so the clean-image share
        of captioning examples stays below its limit."""
        if self.cfg.timestep_sampling == "logit_normal":
            z = torch.randn(n, generator=generator, device=device)
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        else:
            u = torch.rand(n, generator=generator, device=device)
        limit = torch.as_tensor(self.T if max_t is None else max_t, device=device)
        return (u * limit).long().clamp(max=self.T - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise (B, C, h, w); t (B,) -> x_t (B, C, h, w), float32.

        Computed in float32 whatever the inputs' dtype: under bf16 autocast the frozen VAE
        returns bf16 latents, and diffusers casts ᾱ_t to the sample's dtype, where 1 − ᾱ_t
        rounds to 0 for t ≤ 20 of the cosine schedule (clean images labelled as noised), and
        σ = t/T rounds to the nearest 1/128 near 1."""
        x0, noise = x0.float(), noise.float()
        if self.cfg.objective == "ddpm":
            return self.ddpm.add_noise(x0, noise, t)
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model regresses: ε (ddpm) or the velocity ε - x0 (flow), float32 (as
        :meth:`add_noise`)."""
        noise = noise.float()
        return noise if self.cfg.objective == "ddpm" else noise - x0.float()

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.dtype) / self.T).view(-1, *([1] * (like.dim() - 1)))

    def predict_x0(
        self, x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The clean image implied by a model output (for logging and sanity checks)."""
        if self.cfg.objective == "flow":
            return x_t - self._sigma(t, x_t) * model_out
        abar = self.ddpm.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - (1 - abar).sqrt() * model_out) / abar.sqrt()

    # -- sampling -------------------------------------------------------------------------
    def sampler(self, steps: int | None = None):
        """A fresh diffusers scheduler with ``steps`` inference steps set.

        Iterate ``for t in s.timesteps`` and call ``s.step(model_out, t, x).prev_sample``.

        DDIM uses "leading" spacing with ``steps_offset=1`` (Stable Diffusion's setting), so the
        first step is t = T - T/steps + 1, not T - 1. With the cosine schedule ᾱ(999) ≈ 2e-9:
        an ε-prediction there implies x0 = (x_t - √(1-ᾱ) ε̂) / √ᾱ, which multiplies any error
        in ε̂ by ~2·10⁴, and the first DDIM step carries that into every later one ("trailing"
        spacing, Lin et al. 2024, arXiv:2305.08891, is only safe with v-prediction). Our tiny
        models sampled pure texture with "trailing" and clean scenes with "leading"
        (docs/results.md); ``test_diffusion`` checks that a slightly wrong ε stays harmless.
        """
        steps = steps or self.cfg.sample_steps
        if self.cfg.objective == "ddpm":
            s = DDIMScheduler.from_config(
                self.ddpm.config,
                timestep_spacing="leading",
                steps_offset=1,
                clip_sample=False,
                set_alpha_to_one=True,
            )
        else:
            s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.T, shift=1.0)
        s.set_timesteps(steps)
        return s

    def guided(self, t: torch.Tensor | float, interval=None) -> bool:
        """Whether classifier-free guidance applies at sampler timestep ``t``: its noise level
        t/T lies in ``interval`` (default: the config's ``guidance_interval``; None = always)."""
        interval = self.cfg.guidance_interval if interval is None else interval
        if interval is None:
            return True
        lo, hi = interval
        return lo < float(t) / self.T <= hi

    def model_timestep(
        self, t: torch.Tensor | float, batch: int, device: torch.device | str
    ) -> torch.Tensor:
        """The conditioning timestep (B,) for a sampler timestep (both objectives use 0..T)."""
        return torch.full((batch,), float(t), device=device)
