"""The per-layer low-rank predictor of DSV and its training on sampled query rows.

q_lr = q @ Wq[h] and k_lr = k @ Wk[h] (rank r per head) approximate the pre-softmax
logits q . k^T by q_lr . k_lr^T at a fraction of the cost; selection ranks KV blocks
with them. The predictor trains on its own: the target is the true logits of a few
sampled query rows, inputs are detached, and a small Adam (kept in buffers so it is
checkpointed and sharded with the model) updates it. Its weights are parameters with
requires_grad=False, so the model's optimizer and DDP never touch them, and all of its
state stays float32 when the model is cast to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam as functional_adam

from ..ops.cosine_rows import cosine_rows
from .fp32_state import Float32State

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm(a, b) in float32. On the GPU, half-precision inputs go in as they are, with float32
    accumulation and output (bmm's out_dtype): products of bf16 values are exact in float32, so this
    equals the product of the inputs cast to float32 up to the order of additions, without float32
    copies of them (strided views, e.g. transposed, are read as they are)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


GRAM_PART_KEYS = 2048   # at least this many keys per partial Gram matrix of key_gram
GRAM_MAX_PRODUCTS = 256  # at most this many partial products (batch x heads x parts) in its one bmm


def key_gram(k: torch.Tensor) -> torch.Tensor:
    """K^T K [b, h, d, d] (float32) of keys k [S, b, h, d] (the layer's layout) per batch element and
    head: one batched product over the keys as they are (bmm_float32), without float32 copies and their
    transposition to [b, h, ...] on the GPU (with those and an unfused Adam, a stage-1 step of `small` at
    16k tokens took 4.9 ms of GPU time more than dense, now 0.6 ms: bench/results/step_h200/s8; measured
    at 16k only).

    One product per (b, h) is a single output tile reduced over all S keys: 16 tiles for `small`, 25 us
    per layer on the H200 for 33 MB of keys, bound by the reduction's latency. So token i goes to part
    i % parts: where the keys' token stride is b x h times their head stride (packed keys, as rotary
    embeddings leave them, or a slice of a [S, b, h, 3d] fused projection) the parts merge with (b, h)
    into one batch axis of a view, the bmm makes parts times as many tiles, and a sum adds the partial
    Grams. Other layouts are multiplied in one part."""
    s, b, h, d = k.shape
    rows = k.reshape(s, b * h, d)   # a view where b and h merge (also a slice of a fused QKV projection)
    parts = min(s // GRAM_PART_KEYS, GRAM_MAX_PRODUCTS // (b * h))
    while parts > 1 and s % parts:
        parts -= 1
    if parts > 1:
        split = rows.unflatten(0, (s // parts, parts))   # [S / parts, parts, b * h, d]
        if split.stride(1) == b * h * split.stride(2):
            rows = split.flatten(1, 2)
        else:
            parts = 1
    grams = bmm_float32(rows.permute(1, 2, 0), rows.permute(1, 0, 2))
    return (grams.view(parts, b, h, d, d).sum(0) if parts > 1 else grams.view(b, h, d, d))


class LowRankPredictor(Float32State):
    """Per-head projections of q and k to rank r, with their own Adam state.

    Args:
        heads: heads held by this rank (after tensor-parallel split).
        head_dim: d.
        rank: r.
        seed: initial weights are drawn from a generator seeded with (seed, global head id), so
            every data-parallel replica starts identical and a TP split equals the unsplit model.
        head_offset: global id of this rank's first head.
    """

    def __init__(self, heads: int, head_dim: int, rank: int, *, seed: int, head_offset: int = 0,
                 device=None):
        super().__init__()
        w = torch.empty(heads, head_dim, rank)
        for h in range(heads):
            gen = torch.Generator().manual_seed(seed * 100_003 + head_offset + h)
            # A shared random projection for q and k: q P P^T k is an unbiased (JL) estimate of
            # q . k, a sensible start for the logits the predictor learns to match.
            w[h] = torch.randn(head_dim, rank, generator=gen) / rank ** 0.5
        self.wq = nn.Parameter(w.clone().to(device), requires_grad=False)
        self.wk = nn.Parameter(w.to(device), requires_grad=False)
        for name in ("wq", "wk"):
            self.register_buffer(f"{name}_exp_avg", torch.zeros_like(getattr(self, name)))
            self.register_buffer(f"{name}_exp_avg_sq", torch.zeros_like(getattr(self, name)))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.float32, device=device))
        # apply_grads' check of the gradients (not state: not in checkpoints)
        self.register_buffer("found_inf", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("unit_scale", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        self._cast = {}  # (which, dtype) -> weights cast to the activations' dtype, until the next update

    # ------------------------------------------------------------- projection
    def project(self, x: torch.Tensor, which: str, heads=None, cached: bool = True) -> torch.Tensor:
        """[..., n, d] -> [..., n, r] with Wq ("q") or Wk ("k") of `heads` (default: all), in x's dtype.
        The cast weights are kept until the next update (cached=False casts anew)."""
        src = self.wq if which == "q" else self.wk
        if cached and not torch.compiler.is_compiling():   # (a compiled graph fuses the cast into its use)
            key = (which, x.dtype, x.device)
            # Storage and in-place updates (loads, copies; after apply_grads, weights_updated clears the cache).
            version = (src.data_ptr(), src._version)
            if key not in self._cast or self._cast[key][0] != version:
                self._cast[key] = (version, src.detach().to(x.dtype))
            w = self._cast[key][1]
        else:
            w = src.detach().to(x.dtype)
        if heads is not None:
            w = w[list(heads)]
        return torch.einsum("...hd,hdr->...hr", x, w)

    def _apply(self, fn, *args, **kwargs):
        self._cast.clear()  # moved or cast: the cached copies belong to the old tensors
        return super()._apply(fn, *args, **kwargs)

    # --------------------------------------------------------------- training
    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor, cos_weight: float) -> torch.Tensor:
        """Per-head loss [h] of predicted vs true logits [b, h, rows, S], averaged over batch and rows:
        cos_weight * cosine distance + (1 - cos_weight) * squared distance of L2-normalised rows
        (the paper's 0.95 / 0.05 mix by default).

        Unit vectors at cosine c lie 2 (1 - c) apart squared, so the mix is (2 - cos_weight) *
        (1 - c). The definition of the loss; training computes it without the logits
        (:meth:`gram_loss`, tested against this)."""
        cos = F.cosine_similarity(pred, target, dim=-1)
        return ((2.0 - cos_weight) * (1.0 - cos)).mean(dim=(0, 2))

    @staticmethod
    def gram_loss(q: torch.Tensor, gram: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, scale: float,
                  cos_weight: float, grad_scale: float = 1.0, backend: str = "auto") -> tuple:
        """:meth:`loss` of the predicted logits (q wq)(k wk)^T against the true ones scale * q k^T, and its
        gradients, for rows q [h, b, rows, d] and keys given by their Gram matrices K^T K [b, h, d, d]
        (key_gram; float32, as wq, wk [h, d, r]), without either [b, h, rows, S] tensor and without
        autograd. Returns (loss [h], d/dwq, d/dwk of grad_scale * loss.sum()).

        The predicted row is p = q W K^T with W = wq wk^T [d, d], so the loss needs per row only three
        quadratic forms in the Gram G = K^T K, the only pass over the keys: p.t = scale (qW) G q^T,
        |p|^2 = (qW) G (qW)^T, |t|^2 = scale^2 q G q^T. The cost is O(S d^2) per head for G and
        O(rows d^2) after it, not O(rows S (d + r)) plus passes over two rows x S tensors. The gradient
        is written out. With P = qW and cos = p.t / (|p| |t|) (the scale cancels),
        d cos / dP = G q / (|p| |q G q^T|^(1/2)) - cos G P / |p|^2, dL/dP = -c d cos/dP for the loss's
        per-row weight c, dL/dW = sum over rows of q^T dL/dP, dL/dwq = dL/dW wk, dL/dwk = dL/dW^T wq.
        The rows' terms after the products with G (cos and dL/dP) are ops.cosine_rows: on the GPU one
        Triton kernel in place of ~20 small ops, which under a CUDA graph are as many nodes a replay
        launches (bench/predictor_upkeep.py)."""
        h, b, n, d = q.shape
        g = gram.transpose(0, 1)                                   # [h, b, d, d], symmetric
        w = torch.bmm(wq, wk.transpose(1, 2))                     # [h, d, d]
        p = torch.bmm(q.reshape(h, b * n, d), w).view(h, b, n, d)
        pq = torch.cat([p, q], dim=2)                              # [h, b, 2n, d]: one product with G
        per_row = (2.0 - cos_weight) / (b * n)                     # -d loss / d cos of one row
        one_minus_cos, grad_p = cosine_rows(pq, torch.matmul(pq, g), scale=scale, weight=per_row * grad_scale,
                                            backend=backend)
        loss = one_minus_cos.sum(dim=(1, 2)) * per_row
        grad_w = torch.bmm(q.reshape(h, b * n, d).transpose(1, 2), grad_p.reshape(h, b * n, d))
        return loss, torch.bmm(grad_w, wk), torch.bmm(grad_w.transpose(1, 2), wq)

    @torch.no_grad()
    def apply_grads(self, grad_q: torch.Tensor, grad_k: torch.Tensor, lr: float) -> None:
        """One Adam step on (wq, wk) with the given gradients, skipped on the device where any of them is not
        finite (a step whose q or k overflowed: one such update would leave the weights NaN for good, as the
        model's own loss scaler skips its step). Call weights_updated() once it has run (after the replay,
        where a CUDA graph holds it)."""
        # The check GradScaler runs before a fused optimizer, which then skips its update (and step count)
        # where found_inf is set: no host sync, so it also runs inside CUDA graphs.
        found_inf = self.found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_([grad_q, grad_k], found_inf, self.unit_scale)
        steps = [self.adam_step.clone(), self.adam_step.clone()]  # adam() increments these
        functional_adam(
            [self.wq, self.wk], [grad_q, grad_k],
            [self.wq_exp_avg, self.wk_exp_avg], [self.wq_exp_avg_sq, self.wk_exp_avg_sq], [],
            steps,
            amsgrad=False, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], lr=lr, weight_decay=0.0,
            eps=ADAM_EPS, maximize=False, foreach=False,
            # One fused kernel updates both weights (the single-tensor update launched ~30 kernels per layer,
            # bench/results/step_h200/s8), reading the step count where it is (the single-tensor update read
            # it on the host: a device sync per update, and a graph capture that fails).
            capturable=self.wq.is_cuda, fused=True, found_inf=found_inf,
        )
        self.adam_step.copy_(steps[0])

    def weights_updated(self) -> None:
        """Drop the weights' cast copies (project): the fused Adam update writes the weights without
        bumping their version counters (torch 2.11), by which project() tells a cast copy stale."""
        self._cast.clear()
