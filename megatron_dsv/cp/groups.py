"""The hybrid context-parallel group: P ranks seen as a U x R grid.

A :class:`HybridCPGroup` wraps Megatron-Core's context-parallel process group and its
global ranks. It creates no communicators: every collective of the hybrid scheme is an
``all_to_all_single`` over the whole CP group whose split matrix is block-diagonal
(non-zero only between members of one U group, or of one R group), or a point-to-point
send/recv addressed by global rank. So any (U, R) factorisation of P can be used per
layer, chosen by the planner, at no setup cost; NCCL and gloo skip zero-sized peers.

Grid (CP index c = position of the rank in ``ranks``):
    u = c % U   (position in the head-parallel group: U consecutive ranks, inside a node)
    j = c // U  (position in the sequence-parallel group: ranks u, u+U, u+2U, ...)
Rank c holds tokens [c * s_local, (c + 1) * s_local) of the sequence, so a U group holds
the contiguous segment j of length U * s_local.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Grid:
    """The U x R grid seen from one rank (all indices are CP indices, not global ranks)."""

    P: int
    U: int
    index: int

    def __post_init__(self):
        if self.U < 1 or self.P % self.U:
            raise ValueError(f"head-parallel size U={self.U} must divide the context-parallel size P={self.P}")
        if not 0 <= self.index < self.P:
            raise ValueError(f"CP index {self.index} is outside [0, {self.P})")

    @property
    def R(self) -> int:
        return self.P // self.U

    @property
    def u(self) -> int:
        return self.index % self.U

    @property
    def j(self) -> int:
        return self.index // self.U

    def at(self, u: int, j: int) -> int:
        """CP index of grid position (u, j)."""
        return j * self.U + u

    @property
    def u_peers(self) -> List[int]:
        """CP indices of this rank's head-parallel group, in u order (includes itself)."""
        return [self.at(u, self.j) for u in range(self.U)]

    @property
    def r_peers(self) -> List[int]:
        """CP indices of this rank's sequence-parallel group, in j order (includes itself)."""
        return [self.at(self.u, j) for j in range(self.R)]


@dataclass
class CommRecord:
    """Bytes one rank sent and received in one collective (for tests and accounting)."""

    name: str
    sent: int
    received: int


_HOST_GROUPS: dict = {}


def _host_group(group, ranks: tuple):
    """A gloo group of the same ranks (the group itself when it is gloo), made once per rank set by its
    members only, with the CP group's own timeout (Megatron's distributed_timeout_minutes)."""
    if dist.get_backend(group) == "gloo":
        return group
    if ranks not in _HOST_GROUPS:
        _HOST_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", timeout=_timeout(group),
                                             use_local_synchronization=True)
    return _HOST_GROUPS[ranks]


def _timeout(group):
    """The collective timeout of a process group (torch keeps it in its backend's options)."""
    try:
        return group._get_backend(torch.device("cuda")).options._timeout
    except Exception:  # noqa: BLE001 - older torch or another backend: torch's default for new groups
        return None


# The backward phases that are collectives (attention_bwd computes).
COMM_BWD_PHASES = ("a2a_bwd", "gather_bwd", "exchange_bwd")


@contextmanager
def failures_named(message: str):
    """A RuntimeError raised inside (a collective that timed out or lost a peer: gloo raises these
    synchronously, NCCL's watchdog reports its own) re-raised as "message (error)", so it says who waited.
    Out-of-memory and NotImplementedError keep their types."""
    try:
        yield
    except (NotImplementedError, torch.OutOfMemoryError):   # (RuntimeErrors too, but no collective's)
        raise
    except RuntimeError as e:
        raise RuntimeError(f"{message} ({e})") from e


class HybridCPGroup:
    """Megatron-Core's context-parallel ranks, used as a U x R grid.

    Args:
        process_group: the CP process group (``parallel_state.get_context_parallel_group()``);
            None means the default (world) group.
        ranks: its global ranks in CP order (``parallel_state.get_context_parallel_global_ranks()``);
            None means ``range(world_size)`` (only valid with the default group).
        record: keep a :class:`CommRecord` per collective in ``self.log`` (tests, benchmarks).

    ``timer``: None, or a region timer (``megatron_dsv.timing.ForwardTimer``) that the CP path
    times its phases into (all-to-all, selection, K-lowrank gather, exchange, attention; ``_bwd`` for
    backward): set by benchmarks, read after the step; None costs nothing.
    """

    def __init__(self, process_group=None, ranks: Optional[Sequence[int]] = None, *, record: bool = False):
        if not dist.is_initialized():
            raise ValueError("HybridCPGroup needs torch.distributed to be initialised")
        if ranks is None:
            if process_group is not None and process_group != dist.group.WORLD:
                raise ValueError("pass the global ranks of a non-default CP process group")
            ranks = list(range(dist.get_world_size()))
        self.group = process_group
        self.ranks = [int(r) for r in ranks]
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"CP ranks must be distinct, got {self.ranks}")
        if dist.get_world_size(process_group) != len(self.ranks):
            raise ValueError(f"{len(self.ranks)} CP ranks given but the process group has "
                             f"{dist.get_world_size(process_group)} members")
        me = dist.get_rank()
        if me not in self.ranks:
            raise ValueError(f"global rank {me} is not among the CP ranks {self.ranks}")
        self.index = self.ranks.index(me)
        self.record = record
        self.log: List[CommRecord] = []
        self.timer = None
        self.label = None   # whose collectives these are (a layer), named where a backward phase fails

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def device(self) -> torch.device:
        """Where this group's small metadata tensors live (NCCL needs CUDA tensors, gloo CPU ones)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def grid(self, U: int) -> Grid:
        return Grid(self.size, U, self.index)

    def check_same(self, what: str, values: Sequence[int], names: Optional[Sequence[str]] = None) -> None:
        """Raise on every rank, naming `what` and each rank's values, unless all CP ranks pass the same
        ints (with `names`, one per value: `what` is whose values they are, and the message gives only the
        names and values that differ). Over gloo on the host
        (a group of these ranks made once): no device synchronisation, and the check precedes the first
        collective whose sizes depend on them (a mismatch there aborts in the backend's C++ code or hangs)."""
        mine = torch.tensor([int(x) for x in values], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine, group=_host_group(self.group, tuple(self.ranks)))
        if any(not torch.equal(g, mine) for g in gathered):
            cols = range(len(mine))
            if names is not None:
                cols = [i for i in cols if any(g[i] != mine[i] for g in gathered)]
                what = f"{what}: {', '.join(names[i] for i in cols)}"
            per_rank = ", ".join(f"rank {r}: {tuple(g[i].item() for i in cols)}" for r, g in zip(self.ranks, gathered))
            raise ValueError(f"{what} differ across the context-parallel ranks ({per_rank})")

    @contextmanager
    def phase(self, name: str, device: torch.device):
        """Context of one CP phase, timed into ``self.timer`` when one is set. A communication phase of the
        backward (COMM_BWD_PHASES) whose collective fails synchronously (gloo: a timeout, a lost peer)
        raises naming ``self.label``, the layer whose backward waited (in the forward the layer names
        itself; failures_named)."""
        named = self.label is not None and name in COMM_BWD_PHASES
        with (failures_named(f"{self.label}: context-parallel {name} failed") if named else nullcontext()), \
                (self.timer(name, device) if self.timer is not None else nullcontext()):
            yield

    def note(self, name: str, sent: int, received: int) -> None:
        if self.record:
            self.log.append(CommRecord(name, int(sent), int(received)))
