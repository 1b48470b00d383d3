"""The head all-to-all's local copies: gathering each peer's heads into the send buffer and
scattering received heads back, by index_select / index_copy_ along the head dim against one
strided copy per head (2-byte and 8-byte elements), on one CP rank's shard.

    python bench/head_copies.py                      # 64k tokens over 2 ranks: 32k x 16 x 128 bf16
    python bench/head_copies.py --tokens 65536 --heads 16 --head-dim 128

Prints one line per variant (median ms, triton.testing.do_bench); megatron_dsv.cp.all_to_all
uses the faster of each direction.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768, help="tokens of the rank's shard")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    s, H, D = args.tokens, args.heads, args.head_dim
    x = torch.randn(s, 1, H, D, device="cuda", dtype=torch.bfloat16)
    # Two ranks' heads as the LPT assignment of bench/cp_bench.py gave them (uneven ids, even counts).
    heads_of = [[0, 1, 2, 8, 10, 12, 14, 15], [3, 4, 5, 6, 7, 9, 11, 13]] if H == 16 else [
        list(range(0, H, 2)), list(range(1, H, 2))]
    unit = s * D
    send, out = torch.empty(x.numel(), dtype=x.dtype, device="cuda"), torch.empty_like(x)
    pieces = [(send[sum(map(len, heads_of[:u])) * unit:][:len(hs) * unit].view(s, 1, len(hs), D), hs)
              for u, hs in enumerate(heads_of)]

    def gather_index_select():
        for dst, hs in pieces:
            torch.index_select(x, 2, torch.tensor(hs, device="cuda"), out=dst)

    def gather_copies(words: bool):
        src = x.view(torch.int64) if words else x
        for dst, hs in pieces:
            dst = dst.view(torch.int64) if words else dst
            for i, h in enumerate(hs):
                dst[:, :, i].copy_(src[:, :, h])

    def scatter_index_copy():
        for src, hs in pieces:
            out.index_copy_(2, torch.tensor(hs, device="cuda"), src)

    def scatter_copies():
        for src, hs in pieces:
            for i, h in enumerate(hs):
                out[:, :, h].copy_(src[:, :, i])

    gather_index_select()
    want = send.clone()
    for variant in (lambda: gather_copies(False), lambda: gather_copies(True)):
        send.zero_()
        variant()
        assert torch.equal(send, want)
    scatter_index_copy()
    want = out.clone()
    out.zero_()
    scatter_copies()
    assert torch.equal(out, want)
    mib = 2 * x.numel() * x.element_size() / 2 ** 20
    print(f"{torch.cuda.get_device_name()}; shard {s} x {H} x {D} bf16; {mib:.0f} MiB moved per call")
    for name, fn in (("gather: index_select", gather_index_select),
                     ("gather: copy per head", lambda: gather_copies(False)),
                     ("gather: copy per head, 8-byte words", lambda: gather_copies(True)),
                     ("scatter: index_copy_", scatter_index_copy),
                     ("scatter: copy per head", scatter_copies)):
        print(f"{name:>38}: {do_bench(fn, warmup=20, rep=100):.3f} ms")


if __name__ == "__main__":
    main()
