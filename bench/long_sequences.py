"""DSV's ops at the long end of the users' range (256k-512k tokens, one GPU): the selection's transient
memory, with its keys held whole and in parts (triton_selection.SCORE_KEYS_BYTES), and a forward +
backward of the block-sparse attention at 512k, its output checked on sampled query blocks against
attention computed directly over their selected keys. The attention's peak is what a step allocates above
q, k, v and their gradients (held from the step before, as in training between micro-batches).

    python bench/long_sequences.py --json bench/results/long_h200/long_sequences.json

16 heads x 128 (q, k, v), rank 32 projections (q_lr, k_lr), bf16, blocks 64 x 64, 10% of the KV blocks
per query block. Peak memory is torch's allocator peak above the inputs during one call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_dsv.ops import triton_selection as ts  # noqa: E402
from megatron_dsv.ops.block_sparse import block_sparse_attention  # noqa: E402
from megatron_dsv.ops.selection import select_blocks  # noqa: E402

H, D, RANK, BLOCK = 16, 128, 32, 64
DTYPE = torch.bfloat16


def peak_mb(fn) -> float:
    """Allocator peak above what is allocated before fn(), in MB (fn's outputs dropped)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 20


def selector(s: int, density: float, g: torch.Generator):
    """select() -> (kv_idx, kv_cnt) of random rank-RANK projections of s tokens at this density, and n_kv."""
    q_lr, k_lr = (torch.randn(1, s, H, RANK, device="cuda", dtype=DTYPE, generator=g) for _ in range(2))
    n_kv = -(-s // BLOCK)
    topk = max(1, round(density * n_kv))
    return (lambda: select_blocks(q_lr, k_lr, topk, block_q=BLOCK, block_kv=BLOCK, backend="triton")), n_kv


def selection_arms(s: int, density: float) -> list:
    select, n_kv = selector(s, density, torch.Generator(device="cuda").manual_seed(s))
    rows = []
    results = {}
    for arm, part_rows in (("whole", n_kv), ("parts", None)):
        if part_rows is None:
            ts.CONFIG_OVERRIDE.pop("score_part_rows", None)
        else:
            ts.CONFIG_OVERRIDE["score_part_rows"] = part_rows
        results[arm] = select()
        rows.append(dict(tokens=s, arm=arm, parts=-(-n_kv // ts._rows_per_part(H * n_kv, n_kv)),
                         ms=do_bench(select, warmup=3, rep=40, return_mode="median"), peak_mb=peak_mb(select)))
    ts.CONFIG_OVERRIDE.pop("score_part_rows", None)
    same = all(torch.equal(a, b) for a, b in zip(results["whole"], results["parts"]))
    for row in rows:
        row["same_blocks"] = same
    return rows


def attention_at(s: int, density: float, samples: int = 8) -> dict:
    """Selection + forward + backward at s tokens, timed, and the output of `samples` query blocks per head
    against softmax(q k^T) v over their selected keys, in float32."""
    g = torch.Generator(device="cuda").manual_seed(s + 1)
    q, k, v, do = (torch.randn(1, s, H, D, device="cuda", dtype=DTYPE, generator=g) for _ in range(4))
    select, n_kv = selector(s, density, g)
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        out = block_sparse_attention(q, k, v, *select(), block_q=BLOCK, block_kv=BLOCK, backend="triton")
        out.backward(do)
        return out

    out = step()
    ms = do_bench(step, warmup=1, rep=5, return_mode="median")
    peak = peak_mb(step)
    kv_idx, kv_cnt = select()
    worst = 0.0
    blocks = torch.randint(0, n_kv, (samples,), generator=torch.Generator().manual_seed(s)).tolist()
    blocks[-1] = n_kv - 1   # the last query block: offsets at their largest
    with torch.no_grad():
        for h in range(H):
            for i in blocks:
                ids = kv_idx[0, h, i, :kv_cnt[0, h, i]].long()
                tok = (ids[:, None] * BLOCK + torch.arange(BLOCK, device="cuda")).flatten()
                qi = q[0, i * BLOCK:(i + 1) * BLOCK, h].float()
                p = torch.softmax(qi @ k[0, tok, h].float().T * D ** -0.5, dim=-1)
                want = p @ v[0, tok, h].float()
                got = out[0, i * BLOCK:(i + 1) * BLOCK, h].float()
                worst = max(worst, float((got - want).norm() / want.norm()))
    return dict(tokens=s, ms_select_fwd_bwd=ms, peak_mb=peak, sampled_blocks_per_head=len(blocks),
                max_rel_err_vs_direct=worst, finite_grads=all(bool(t.grad.isfinite().all()) for t in (q, k, v)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[65536, 262144, 524288])
    ap.add_argument("--attention-seq", type=int, default=524288)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, heads=H, head_dim=D, rank=RANK,
                block=BLOCK, density=args.density, score_keys_bytes=ts.SCORE_KEYS_BYTES)
    selection = [row for s in args.seqs for row in selection_arms(s, args.density)]
    attention = attention_at(args.attention_seq, args.density) if args.attention_seq else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, selection=selection, attention=attention), indent=1))
    print(f"{meta['device']}: {H} heads, rank {RANK}, blocks {BLOCK}x{BLOCK}, density {args.density}")
    print("| tokens | keys held | parts | selection ms | peak MB above inputs | same blocks |")
    print("|---|---|---|---|---|---|")
    for r in selection:
        print(f"| {r['tokens']} | {r['arm']} | {r['parts']} | {r['ms']:.2f} | {r['peak_mb']:.0f} | {r['same_blocks']} |")
    if attention:
        print(f"attention at {attention['tokens']} tokens: selection + forward + backward "
              f"{attention['ms_select_fwd_bwd']:.1f} ms, peak {attention['peak_mb']:.0f} MB above inputs, "
              f"sampled blocks max rel. err {attention['max_rel_err_vs_direct']:.2e}, "
              f"finite grads {attention['finite_grads']}")


if __name__ == "__main__":
    main()
