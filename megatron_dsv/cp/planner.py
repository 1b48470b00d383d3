"""Planner of the hybrid CP scheme: head -> U-rank assignment, (U, R) and KV schedule from a cost model.

Every rank calls :func:`plan` with the same inputs and gets the same plan: the planner is
plain Python arithmetic on floats with deterministic tie-breaking (no randomness, no
dict-order or device dependence). Budgets must therefore be identical on every rank
(profiled sparsities averaged over the CP group, see :func:`~megatron_dsv.cp.allreduce_head_stats`);
``check_plan_identical`` compares plan digests across ranks in debug mode.

Cost model (per layer, forward + backward, of the slowest rank):
  compute   sum over its heads of min(sparse, dense) kernel time: 4 b S^2 d (1 + bwd) / R FLOPs
            times the head's density at the sparse rate, or all of it at the dense rate
            (the dispatch never runs sparse when dense is faster);
  a2a       q, k, v, out forward and their gradients backward, over NVLink when U fits in a node;
  klr       the all-gather of the low-rank keys for the selection (forward only);
  exchange  the KV blocks a rank's query blocks select from other segments, forward, and their
            gradients backward; unique blocks per head = min(1, kv_union * density) of the
            blocks (an assumption: neighbouring cubes share most of their critical keys), for a
            share f of a split head's query blocks min(1, density * (1 + (kv_union - 1) * f));
            "gather" adds exchange to compute, "ring" overlaps round t+1's transfer with round
            t's forward attention (backward gradients are returned after the backward compute).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

ASSIGNMENTS = ("lpt", "capped", "split", "naive")
SCHEDULES = ("gather", "ring")


@dataclass(frozen=True)
class CostModel:
    """Machine parameters of the cost model; every field is an assumption to be calibrated."""

    sparse_tflops: float = 400.0
    """Effective fwd+bwd TFLOP/s of the block-sparse kernel on computed blocks (selection included)."""
    sparse_curve: Tuple[Tuple[float, float], ...] = ()
    """Measured (density, effective fwd+bwd TFLOP/s) points; when given, the rate at a density is
    interpolated linearly between them (clamped at the ends) instead of sparse_tflops."""
    dense_tflops: float = 580.0
    """Fwd+bwd TFLOP/s of the dense kernel (H100 cuDNN, measured: 575-585)."""
    bwd_factor: float = 2.5
    """Backward FLOPs / forward FLOPs."""
    intra_node_gbps: float = 300.0
    """Per-GPU all-to-all bandwidth inside a node, GB/s (H100 NVLink: 450 GB/s per direction, ~2/3 achieved)."""
    inter_node_gbps: float = 45.0
    """Per-GPU bandwidth across nodes, GB/s (one 400 Gb/s InfiniBand NIC per GPU, ~90% achieved)."""
    gpus_per_node: int = 8
    latency_s: float = 15e-6
    """Per message (per peer of a collective, per ring round)."""
    bytes_per_elem: int = 2
    """bf16 activations."""
    kv_union: float = 3.0
    """Unique KV blocks selected by a whole segment, as a multiple of one query block's budget."""
    memory_limit_gib: float = math.inf
    """Per-GPU limit for one layer's attention tensors (q, k, v, out, received blocks, transient buffers)."""

    def __post_init__(self):
        for name in ("sparse_tflops", "dense_tflops", "intra_node_gbps", "inter_node_gbps", "kv_union",
                     "memory_limit_gib"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)}")
        if any(not (0 < x <= 1 and r > 0) for x, r in self.sparse_curve):
            raise ValueError(f"CostModel.sparse_curve needs (density in (0, 1], rate > 0) points, got {self.sparse_curve}")
        if self.gpus_per_node < 1 or self.bytes_per_elem < 1 or self.latency_s < 0 or self.bwd_factor < 0:
            raise ValueError("CostModel: gpus_per_node and bytes_per_elem must be >= 1, latency_s and "
                             "bwd_factor >= 0")


@dataclass(frozen=True)
class Shape:
    """The attention problem of one layer (whole sequence, all heads)."""

    seq_len: int
    heads: int
    head_dim: int
    batch: int = 1
    block_q: int = 64
    block_kv: int = 64
    lr_rank: int = 16

    @property
    def n_kv(self) -> int:
        return -(-self.seq_len // self.block_kv)


@dataclass(frozen=True)
class CPPlan:
    """One layer's plan.

    ``heads_of[u]``: ascending global head ids that U-rank u computes. Every head appears at least
    once; a head split by the planner appears on several ranks, and ``shares[u][i] = (lo, hi, k)``
    says that rank u computes pieces [lo, hi) of k of head heads_of[u][i]'s query blocks (query
    blocks [lo * n // k, hi * n // k) of each segment of n query blocks). Empty ``shares``: no head
    is split (every share (0, 1, 1)).
    """

    P: int
    U: int
    heads_of: Tuple[Tuple[int, ...], ...]
    assignment: str
    schedule: str
    predicted_s: float
    parts_s: Tuple[Tuple[str, float], ...] = field(default=(), compare=False)
    imbalance: float = 1.0
    shares: Tuple[Tuple[Tuple[int, int, int], ...], ...] = ()

    @property
    def R(self) -> int:
        return self.P // self.U

    def share(self, u: int, i: int) -> Tuple[int, int, int]:
        """(lo, hi, k) of the i-th head of U-rank u."""
        return self.shares[u][i] if self.shares else (0, 1, 1)

    def holders_of(self, head: int) -> Tuple[int, ...]:
        return tuple(u for u, hs in enumerate(self.heads_of) if head in hs)

    def digest(self) -> str:
        """Hash of everything that changes what the ranks do (not of the predicted times)."""
        text = repr((self.P, self.U, self.heads_of, self.shares, self.assignment, self.schedule))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- budgets
def densities(budgets, shape: Shape) -> Tuple[float, ...]:
    """Per-head budgets as fractions of the KV blocks.

    Integer tensors/lists are block counts (clipped to [0, n_kv]); floating ones are fractions in [0, 1].
    """
    if isinstance(budgets, torch.Tensor):
        is_int = not budgets.is_floating_point()
        values = budgets.detach().cpu().tolist()
    else:
        values = list(budgets)
        is_int = all(isinstance(x, int) and not isinstance(x, bool) for x in values)
    if len(values) != shape.heads:
        raise ValueError(f"{len(values)} budgets given for {shape.heads} heads")
    if is_int:
        if any(x < 0 for x in values):
            raise ValueError(f"block-count budgets must be >= 0, got {values}")
        return tuple(min(x, shape.n_kv) / shape.n_kv for x in values)
    if any(not (0.0 <= float(x) <= 1.0) for x in values):
        raise ValueError(f"fraction budgets must lie in [0, 1], got {values}")
    return tuple(float(x) for x in values)


def budget_blocks(budgets, n_kv: int) -> torch.Tensor:
    """Per-head budgets as int64 block counts [H]: fractions -> ceil(f * n_kv); counts clipped to n_kv."""
    t = torch.as_tensor(budgets)
    if t.dim() != 1:
        raise ValueError(f"budgets must be 1-D [heads], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"fraction budgets must lie in [0, 1], got {t.tolist()}")
        return torch.ceil(t.double() * n_kv - 1e-9).clamp(0, n_kv).to(torch.int64)
    if bool((t < 0).any()):
        raise ValueError(f"block-count budgets must be >= 0, got {t.tolist()}")
    return t.to(torch.int64).clamp(max=n_kv)


# ---------------------------------------------------------------------- assignment
def assign_heads(costs: Sequence[float], U: int, method: str = "lpt") -> Tuple[Tuple[int, ...], ...]:
    """Heads -> U ranks. Returns heads_of (ascending ids per rank); every head exactly once.

    lpt:    longest processing time first: heads by cost descending (ties: lower id), each to the
            rank with the least load (ties: fewer heads, then lower rank); uneven counts allowed;
            then a local search moves or swaps single heads off the most loaded rank while that
            lowers it (LPT alone leaves up to one small head of excess on a rank).
    capped: the same with at most ceil(H / U) heads per rank (equal counts when U divides H).
    naive:  Ulysses order: contiguous equal chunks of heads in natural order.
    (split: see :func:`assign_split`.)
    """
    H = len(costs)
    if method not in ("lpt", "capped", "naive"):
        raise ValueError(f"method={method!r} is not one of ['lpt', 'capped', 'naive']")
    if not 1 <= U <= H:
        raise ValueError(f"U={U} must lie in [1, heads={H}] (every head-parallel rank needs a head)")
    if method == "naive":
        return tuple(tuple(h for h in range(H) if h * U // H == u) for u in range(U))
    owned = _assign_items(list(costs), list(range(H)), U, cap=-(-H // U) if method == "capped" else H)
    return tuple(tuple(sorted(items)) for items in owned)


def assign_split(costs: Sequence[float], U: int, n_units: int):
    """Heads split along their query blocks so that every rank gets the same predicted compute.

    McNaughton's wrap-around rule: heads in natural order are laid end to end (head h has n_units
    units of cost costs[h] / n_units, its query blocks) and cut into U runs of equal cost, at unit
    boundaries; rank u takes run u. Imbalance is at most one unit of the costliest head; a run
    boundary splits at most one head, so at most U - 1 heads are split (more only when one head
    costs more than a rank's share). Returns (heads_of, shares) with shares (lo, hi, n_units).
    """
    H = len(costs)
    if not 1 <= U <= H:
        raise ValueError(f"U={U} must lie in [1, heads={H}] (every head-parallel rank needs a head)")
    if n_units < 1:
        raise ValueError(f"n_units must be >= 1, got {n_units}")
    total = float(sum(costs))
    if total <= 0:
        return assign_heads(costs, U, "lpt"), ()
    # Units laid end to end: position h * n_units + m. Cut u (u = 1..U-1) at the unit nearest to
    # cumulative cost u * total / U, kept strictly increasing so that every rank gets a unit.
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    end = H * n_units
    cuts = [0]
    for u in range(1, U):
        target = u * total / U
        h = next(h for h in range(H) if prefix[h + 1] >= target and costs[h] > 0)
        unit = min(n_units, max(0, round((target - prefix[h]) / (costs[h] / n_units))))
        cuts.append(min(max(h * n_units + unit, cuts[-1] + 1), end - (U - u)))
    cuts.append(end)
    heads_of, shares = [], []
    for u in range(U):
        hs, sh = [], []
        for h in range(cuts[u] // n_units, H):
            lo, hi = max(cuts[u] - h * n_units, 0), min(cuts[u + 1] - h * n_units, n_units)
            if hi <= 0:
                break
            if hi > lo:
                hs.append(h)
                sh.append((lo, hi, n_units))
        heads_of.append(tuple(hs))
        shares.append(tuple(sh))
    return tuple(heads_of), tuple(shares)


def _assign_items(costs, group, U, cap):
    """LPT of items (ties: lower item id; rank with least load, then fewer items, then lower id), at
    most `cap` items per rank and never two items of one group on a rank; then a local search."""
    load = [0.0] * U
    owned = [[] for _ in range(U)]
    held = [set() for _ in range(U)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        u = min((u for u in range(U) if len(owned[u]) < cap and group[i] not in held[u]),
                key=lambda u: (load[u], len(owned[u]), u))
        owned[u].append(i)
        held[u].add(group[i])
        load[u] += costs[i]
    _refine(costs, group, owned, held, load, cap)
    return owned


def _refine(costs, group, owned, held, load, cap, max_steps: int = 10000):
    """Move or swap one item between the most loaded rank and another while that lowers the pair's
    maximum below the current maximum; deterministic (fixed scan order, strict improvement)."""
    U = len(owned)
    for _ in range(max_steps):
        hi = max(range(U), key=lambda u: (load[u], -u))
        top = load[hi]
        best = None   # (new pair max, a, v, b or None)
        for a in sorted(owned[hi]):
            for v in range(U):
                if v == hi or group[a] in held[v]:
                    continue
                if len(owned[v]) < cap and len(owned[hi]) > 1:   # move a (keeps an item on every rank)
                    m = max(top - costs[a], load[v] + costs[a])
                    if best is None or m < best[0]:
                        best = (m, a, v, None)
                for b in sorted(owned[v]):
                    if costs[b] < costs[a] and group[b] not in held[hi]:
                        m = max(top - costs[a] + costs[b], load[v] + costs[a] - costs[b])
                        if best is None or m < best[0]:
                            best = (m, a, v, b)
        if best is None or best[0] >= top * (1 - 1e-12):
            return
        _, a, v, b = best
        for item, src, dst in ((a, hi, v),) + (((b, v, hi),) if b is not None else ()):
            owned[src].remove(item)
            held[src].discard(group[item])
            owned[dst].append(item)
            held[dst].add(group[item])
            load[src] -= costs[item]
            load[dst] += costs[item]


# ---------------------------------------------------------------------- cost model
def sparse_rate(density: float, cost: CostModel) -> float:
    """Effective fwd+bwd TFLOP/s of the sparse kernel at a density."""
    pts = sorted(cost.sparse_curve)
    if not pts:
        return cost.sparse_tflops
    if density <= pts[0][0]:
        return pts[0][1]
    for (x0, r0), (x1, r1) in zip(pts, pts[1:]):
        if density <= x1:
            return r0 + (r1 - r0) * (density - x0) / (x1 - x0)
    return pts[-1][1]


def head_compute_s(density: float, shape: Shape, R: int, cost: CostModel) -> float:
    """Forward+backward attention time of one head on one rank (S / R queries over S keys).

    The layer runs the dense kernel when it is faster than the sparse one at this density.
    """
    flops = 4.0 * shape.batch * shape.seq_len * shape.seq_len * shape.head_dim * (1 + cost.bwd_factor) / R
    if density <= 0:
        return 0.0
    return min(density * flops / (sparse_rate(density, cost) * 1e12), flops / (cost.dense_tflops * 1e12))


def link_s(nbytes: float, remote_fraction: float, peers: int, cost: CostModel) -> float:
    """Time of a transfer whose bytes go partly to other nodes (separate links, in parallel)."""
    if nbytes <= 0:
        return 0.0
    intra = nbytes * (1 - remote_fraction) / (cost.intra_node_gbps * 1e9)
    inter = nbytes * remote_fraction / (cost.inter_node_gbps * 1e9)
    return max(intra, inter) + peers * cost.latency_s


def remote_fraction(P: int, U: int, group: str, cost: CostModel) -> float:
    """Share of a U-group (or R-group) peer's traffic that leaves the node (rank c lives on node c // gpn)."""
    gpn = cost.gpus_per_node
    if P <= gpn:
        return 0.0
    if group == "U":
        return 0.0 if U <= gpn and gpn % U == 0 else 1.0 - 1.0 / max(1, math.ceil(U / gpn))
    R = P // U
    same_node = max(1, gpn // U) if U <= gpn else 1
    return (R - min(R, same_node)) / max(1, R - 1)


def estimate(shape: Shape, dens: Sequence[float], P: int, U: int, heads_of, schedule: str,
             cost: CostModel, shares=()) -> Dict[str, float]:
    """Modelled fwd+bwd time of the slowest rank and its parts (seconds), and the largest memory of any rank (GiB)."""
    R = P // U
    S, b, d, e = shape.seq_len, shape.batch, shape.head_dim, cost.bytes_per_elem
    s_local, seg = S / P, S / R
    H = shape.heads
    worst = None
    for u, hs in enumerate(heads_of):
        n = len(hs)
        frac = [(hi - lo) / k for lo, hi, k in shares[u]] if shares else [1.0] * n
        compute = sum(f * head_compute_s(dens[h], shape, R, cost) for h, f in zip(hs, frac))
        # A split head costs each holder whole-head all-to-all and low-rank-key transfers.
        # Head all-to-all: 4 tensors forward (q, k, v, out) and 4 backward.
        a2a_bytes = 8 * s_local * b * d * e * max(sum(len(x) for x in heads_of) - n, (U - 1) * n)
        a2a = link_s(a2a_bytes, remote_fraction(P, U, "U", cost), 8 * (U - 1), cost) if U > 1 else 0.0
        rf = remote_fraction(P, U, "R", cost)
        klr = link_s((R - 1) * seg * b * n * shape.lr_rank * e, rf, R - 1, cost) if R > 1 else 0.0
        # Unique remote KV blocks, forward (K|V) and backward (their gradients).
        # A share f of a head's query blocks selects between one query block's budget (f -> 0) and the
        # whole segment's union (f = 1): min(1, density * (1 + (kv_union - 1) * f)).
        blocks = sum(min(1.0, dens[h] * (1 + (cost.kv_union - 1) * f)) for h, f in zip(hs, frac))
        blocks *= shape.n_kv * b * (R - 1) / R
        x_bytes = blocks * shape.block_kv * 2 * d * e
        id_bytes = blocks * 8
        if R == 1:
            exchange_fwd = exchange_bwd = 0.0
        else:
            exchange_fwd = link_s(x_bytes + id_bytes, rf, 2 * (R - 1), cost)
            exchange_bwd = link_s(x_bytes, rf, R - 1, cost)
        fwd = compute / (1 + cost.bwd_factor)
        bwd = compute - fwd
        if schedule == "gather" or R == 1:
            attn = compute + exchange_fwd + exchange_bwd
        else:  # ring: R rounds, round t+1 in flight during round t's forward
            per_round_c, per_round_x = fwd / R, exchange_fwd / (R - 1)
            attn = per_round_c + (R - 1) * max(per_round_c, per_round_x) + bwd + exchange_bwd
        total = attn + a2a + klr
        # q, k, v, out of my heads + received blocks (kept for backward) + transient send/recv buffers.
        transient = x_bytes if schedule == "gather" or R == 1 else 2 * x_bytes / (R - 1)
        mem_bytes = 4 * seg * b * n * d * e + x_bytes + transient
        row = dict(total=total, compute=compute, a2a=a2a, klr=klr, exchange=exchange_fwd + exchange_bwd,
                   memory_gib=mem_bytes / 2 ** 30, exchange_bytes=x_bytes, a2a_bytes=a2a_bytes)
        if worst is None or total > worst["total"]:
            worst = dict(row, memory_gib=max(row["memory_gib"], worst["memory_gib"]) if worst else row["memory_gib"])
        else:
            worst["memory_gib"] = max(worst["memory_gib"], row["memory_gib"])
    return worst


def paper_like_densities(layers: int, heads: int, *, seed: int = 0, floor: float = 0.05,
                         p_dense_head: float = 0.1):
    """Per-layer, per-head budgets (fractions) shaped like DSV's profiles, for simulations and tests.

    First and last layers dense (1.0); in the others most heads are 90-98% sparse and a head is
    78-84% sparse with probability p_dense_head; budgets = max(floor, 1 - sparsity)
    (floor = DSVConfig.budget_floor). Deterministic in seed (torch.Generator, CPU).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        if layer in (0, layers - 1):
            out.append(tuple([1.0] * heads))
            continue
        u = torch.rand(heads, generator=gen, dtype=torch.float64)
        pick = torch.rand(heads, generator=gen, dtype=torch.float64) < p_dense_head
        sparsity = torch.where(pick, 0.78 + 0.06 * u, 0.90 + 0.08 * u)
        out.append(tuple(max(floor, 1.0 - float(x)) for x in sparsity))
    return out


def _divisors(P: int):
    return [U for U in range(1, P + 1) if P % U == 0]


def plan(budgets, *, shape: Shape, P: int, cost: CostModel = CostModel(), U_candidates: Optional[Sequence[int]] = None,
         schedules: Sequence[str] = SCHEDULES, assignments: Sequence[str] = ("lpt", "capped", "split"),
         max_U: Optional[int] = None) -> CPPlan:
    """The fastest modelled plan for one layer.

    Args:
        budgets: per-head budgets [heads]: fractions of the KV blocks (floats) or block counts (ints).
        shape: the layer's attention shape (whole sequence). P: the context-parallel size.
        U_candidates: head-parallel sizes to try (default: divisors of P up to min(heads, max_U));
            max_U defaults to gpus_per_node (the head all-to-all stays inside a node).
        schedules, assignments: variants to try.
    Ties go to the earlier candidate (smaller U, then the order of assignments and schedules), so the
    result is a pure function of the inputs.
    """
    dens = densities(budgets, shape)
    max_U = cost.gpus_per_node if max_U is None else max_U
    cands = U_candidates if U_candidates is not None else [U for U in _divisors(P) if U <= min(shape.heads, max_U)]
    cands = [U for U in cands if P % U == 0 and 1 <= U <= shape.heads]
    if not cands:
        raise ValueError(f"no head-parallel size U fits P={P}, heads={shape.heads} (U must divide P, U <= heads)")
    for s in schedules:
        if s not in SCHEDULES:
            raise ValueError(f"schedule {s!r} is not one of {list(SCHEDULES)}")
    for a in assignments:
        if a not in ASSIGNMENTS:
            raise ValueError(f"assignment {a!r} is not one of {list(ASSIGNMENTS)}")
    best = None
    for U in cands:
        R = P // U
        costs = [head_compute_s(x, shape, R, cost) for x in dens]
        n_units = max(1, shape.seq_len // (R * shape.block_q))   # query blocks per segment
        for method in assignments:
            heads_of, shares = _assign(costs, U, method, n_units)
            imbalance = _imbalance(costs, heads_of, shares)
            for schedule in schedules:
                est = estimate(shape, dens, P, U, heads_of, schedule, cost, shares)
                if est["memory_gib"] > cost.memory_limit_gib:
                    continue
                if best is None or est["total"] < best.predicted_s:
                    parts = tuple((k, float(v)) for k, v in est.items() if k != "total")
                    best = CPPlan(P, U, heads_of, method, schedule, float(est["total"]), parts, float(imbalance),
                                  shares)
    if best is None:
        raise ValueError(f"no plan fits the memory limit of {cost.memory_limit_gib} GiB")
    return best


def _assign(costs, U, method, n_units=1):
    if method == "split":
        return assign_split(costs, U, n_units)
    return assign_heads(costs, U, method), ()


def _imbalance(costs, heads_of, shares) -> float:
    """max / mean of the per-rank predicted compute."""
    loads = []
    for u, hs in enumerate(heads_of):
        frac = [(hi - lo) / k for lo, hi, k in shares[u]] if shares else [1.0] * len(hs)
        loads.append(sum(costs[h] * f for h, f in zip(hs, frac)))
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def fixed_plan(P: int, U: int, heads: int, *, schedule: str = "gather", assignment: str = "naive",
               costs: Optional[Sequence[float]] = None, n_units: int = 1) -> CPPlan:
    """A plan with a given (U, schedule) and assignment method (naive order by default), no cost model.

    n_units: query blocks per segment, the unit of the "split" assignment."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment={assignment!r} is not one of {list(ASSIGNMENTS)}")
    if P % U:
        raise ValueError(f"U={U} must divide P={P}")
    costs = [1.0] * heads if costs is None else list(costs)
    heads_of, shares = _assign(costs, U, assignment, n_units)
    return CPPlan(P, U, heads_of, assignment, schedule, float("nan"), imbalance=_imbalance(costs, heads_of, shares),
                  shares=shares)


class Replanner:
    """Keeps one layer's plan and recomputes it every ``interval`` steps from the current budgets."""

    def __init__(self, interval: int, **plan_kwargs):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval = interval
        self.plan_kwargs = plan_kwargs
        self.current: Optional[CPPlan] = None
        self.step = 0

    def __call__(self, budgets) -> CPPlan:
        """Plan for this step; call once per training step with identical budgets on every rank."""
        if self.current is None or self.step % self.interval == 0:
            self.current = plan(budgets, **self.plan_kwargs)
        self.step += 1
        return self.current
