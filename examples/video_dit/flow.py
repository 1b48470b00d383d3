"""Rectified-flow (flow-matching) objective and a plain Euler sampler.

x_t = (1 - t) * x_0 + t * noise, t in [0, 1]; the model predicts the velocity
v = noise - x_0 and is trained with MSE. Training times are drawn logit-normal
(sigmoid of N(0, 1)), which weights the middle of the path, as in SD3.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sample_times(batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    return torch.sigmoid(torch.randn(batch, generator=generator)).to(device)


def flow_matching_loss(model, x0: torch.Tensor, caption=None, *, t: Optional[torch.Tensor] = None,
                       noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
    """MSE between predicted and true velocity; t and noise are drawn if not given."""
    if t is None:
        t = sample_times(x0.shape[0], generator, x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    xt = (1 - tb) * x0 + tb * noise
    v = model(xt, t, caption)
    return F.mse_loss(v.float(), (noise - x0).float())


def flow_matching_loss_packed(model, xs, caption=None, *, generator: Optional[torch.Generator] = None):
    """The same objective on clips of different shapes packed into one sequence (model.forward_packed):
    the MSE over all latent elements of all clips."""
    t = sample_times(len(xs), generator, xs[0].device)
    noise = [torch.randn(x.shape, generator=generator).to(x.device) for x in xs]
    xt = [(1 - ti) * x + ti * n for x, n, ti in zip(xs, noise, t.to(xs[0].dtype))]
    v = model.forward_packed(xt, t, caption)
    err = sum(F.mse_loss(vi.float(), (n - x).float(), reduction="sum") for vi, n, x in zip(v, noise, xs))
    return err / sum(x.numel() for x in xs)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, caption=None, steps: int = 20) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 (noise) to t=0 (data)."""
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * model(x, t, caption)
    return x
