"""Host time of the DSV layers' work in an eager training step, function by function, beside dense's.

A step of `small` at 16k tokens x batch 1 is bound by the host's launches when it runs eagerly
(bench/eager_ab.py): there every microsecond the layers spend on the host lengthens the step. This
runs eager steps of the example (bench/step.py's Trainer) for dense (SDPADotProductAttention) and for
DSV in stage 1 (dense attention + the predictor's training every step), one step of each arm in turn,
and times the functions below with perf_counter wrappers (nested ones are counted inside their callers
too). The wrappers cost ~1 us per call, the same in both arms' core attention forward.

Prints, per function, host microseconds per step (summed over the layers) and per call, and the steps'
host time (launch to metrics read, bench/step.py's "host ms"), medians over the rounds; --json writes
it with the device name.

    python bench/host_time.py --micro-batch-size 1 --json bench/results/step_h200/s16/host_time_b1.json
    python bench/host_time.py --smoke    # CPU, tiny shapes: checks the script
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from eager_ab import stage1_setup  # noqa: E402 (bench/ is on the path)
from step import Trainer, set_state  # noqa: E402
from megatron_dsv import timing  # noqa: E402
from megatron_dsv.layers import attention, controller, graphed_upkeep, on_backward, predictor, upkeep_stream  # noqa: E402

DSV = attention.DSVDotProductAttention
# (label, owner, name, is a context manager: its entry and exit are timed, not the block): the core attention's
# forward (dense's self- and cross-attention, DSV's self-attention beside dense's cross-attention), then DSV's parts.
PROBES = [
    ("SDPA core attention forward", attention.SDPADotProductAttention, "forward", False),
    ("DSV core attention forward", DSV, "forward", False),
    ("  dense_attention", attention, "dense_attention", False),
    ("  decisions (in a training step)", DSV, "_decide_outside_graph", False),
    ("  decisions", DSV, "_decide", False),
    ("  forward timer (entry + exit)", timing.ForwardTimer, "__call__", True),
    ("  OnBackward.apply", on_backward.OnBackward, "apply", False),
    ("backward: _learn", DSV, "_learn", False),
    ("  upkeep_stream.aside (entry + exit)", upkeep_stream, "aside", True),
    ("  graphed upkeep (copies + replay)", graphed_upkeep.GraphedUpkeep, "__call__", False),
    ("  _reduce_replicas", DSV, "_reduce_replicas", False),
    ("  apply_grads", predictor.LowRankPredictor, "apply_grads", False),   # (none while the upkeep replays)
    ("end of backward: commit", DSV, "commit", False),
    ("  upkeep_stream.join", upkeep_stream, "join", False),
    ("  record_loss", controller.StageController, "record_loss", False),
    ("  end_step", controller.StageController, "end_step", False),
]


class Probes:
    """perf_counter wrappers around PROBES; totals per label and arm."""

    def __init__(self):
        self.arm = None
        self.seconds = defaultdict(float)   # (arm, label) -> seconds since the last take()
        self.calls = defaultdict(int)
        for label, owner, name, context in PROBES:
            setattr(owner, name, (self._wrap_context if context else self._wrap)(label, getattr(owner, name)))

    def _add(self, label, t0, call=True):
        self.seconds[self.arm, label] += time.perf_counter() - t0
        self.calls[self.arm, label] += call

    def _wrap(self, label, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(label, t0)
        return timed

    def _wrap_context(self, label, fn):
        probes = self

        class Timed:
            def __init__(self, cm):
                self.cm = cm

            def __enter__(self):
                t0 = time.perf_counter()
                try:
                    return self.cm.__enter__()
                finally:
                    probes._add(label, t0)

            def __exit__(self, *exc):
                t0 = time.perf_counter()
                try:
                    return self.cm.__exit__(*exc)
                finally:
                    probes._add(label, t0, call=False)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            cm = fn(*args, **kwargs)
            probes._add(label, t0, call=False)
            return Timed(cm)
        return timed

    def take(self) -> tuple:
        out = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return out


def main():
    args, device, dit, stage1 = stage1_setup(__doc__, "bench/host_time.py", micro_batch_size=1, rounds=20,
                                             smoke_help="CPU, tiny shapes: checks the script")
    arms = {"dense": Trainer(dit, None, args, device), "dsv-stage1": Trainer(dit, stage1, args, device)}
    set_state(arms["dsv-stage1"].layers, stage=1, step=1)
    probes = Probes()
    for name, trainer in arms.items():
        probes.arm = name
        for _ in range(args.warmup):
            trainer.step()
    probes.take()
    host_ms = {name: [] for name in arms}
    per_step = defaultdict(list)   # (arm, label) -> [us per step]
    calls = {}
    for _ in range(args.rounds):
        for name, trainer in arms.items():
            probes.arm = name
            host_ms[name].append(trainer.step()[3])
            seconds, counts = probes.take()
            for key, s in seconds.items():
                per_step[key].append(s * 1e6)
                calls[key] = counts[key]
    order = [label for label, _, _, _ in PROBES]
    rows = [{"arm": arm, "function": label, "us_per_step": statistics.median(us), "calls_per_step": calls[arm, label],
             "us_per_call": statistics.median(us) / calls[arm, label]}
            for (arm, label), us in sorted(per_step.items(), key=lambda kv: (list(arms).index(kv[0][0]),
                                                                             order.index(kv[0][1])))]
    steps = {name: statistics.median(ms) for name, ms in host_ms.items()}
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    out = {"device": name, "torch": torch.__version__, "model": args.model, "micro_batch_size": args.micro_batch_size,
           "rounds": args.rounds, "step_host_ms": steps, "functions": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{name}; {args.model}, {dit.num_tokens} tokens x batch {args.micro_batch_size}; eager steps, "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'arm':>11}  {'function':<36} {'us/step':>9} {'calls':>6} {'us/call':>8}")
    for r in rows:
        print(f"{r['arm']:>11}  {r['function']:<36} {r['us_per_step']:>9.0f} {r['calls_per_step']:>6} "
              f"{r['us_per_call']:>8.1f}")
    print("step host ms: " + ", ".join(f"{arm} {ms:.1f}" for arm, ms in steps.items()) +
          f" (DSV - dense: {steps['dsv-stage1'] - steps['dense']:+.1f} ms)")


if __name__ == "__main__":
    main()
