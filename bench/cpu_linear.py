"""Why the fast path prepacks its CPU weights and pads few rows: one linear layer at 1-9 rows.

``python -m bench.cpu_linear`` times ``torch.nn.functional.linear`` (MKL: matrix-vector for one
row, matrix-matrix for more) against oneDNN's linear on the same weight reordered once
(:class:`decoding.fast.model.Linear` with ``pack=True``), unpadded and as the fast path runs it
(fewer than ``PAD_ROWS_TO`` rows padded to that many), on the 1.5B target's MLP shape
(8960 x 1536) in float32 (``--dtype bfloat16``: as a bfloat16 draft runs), and prints
milliseconds per call by rows. CPU only; seconds to run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from decoding.fast.model import PAD_ROWS_TO, Linear, can_pack_weights


def per_call_ms(fn: Callable[[], torch.Tensor], calls: int) -> float:
    fn()
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_linear", description=__doc__)
    parser.add_argument("--out-features", type=int, default=8960)
    parser.add_argument("--in-features", type=int, default=1536)
    parser.add_argument("--max-rows", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not can_pack_weights(torch.device("cpu"), dtype):
        print(f"this torch build or CPU has no usable oneDNN linear in {args.dtype}; "
              "nothing to compare")
        return 1
    torch.manual_seed(0)
    module = torch.nn.Linear(args.in_features, args.out_features, bias=False, dtype=dtype)
    packed = Linear(module.weight.detach(), None, pack=True)
    padded = Linear(module.weight.detach(), None, pack=True)
    padded.pad_to = PAD_ROWS_TO
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight "
          f"{args.out_features}x{args.in_features} {args.dtype}, ms per call ({args.calls} calls)")
    print(f"{'rows':>4} {'F.linear':>15} {'prepacked (oneDNN)':>19} {'ratio':>6} "
          f"{f'padded to {PAD_ROWS_TO}':>12}")
    with torch.inference_mode():
        for rows in range(1, args.max_rows + 1):
            x = torch.randn(rows, args.in_features, dtype=dtype)
            plain = per_call_ms(lambda: F.linear(x, module.weight), args.calls)  # noqa: B023
            fast = per_call_ms(lambda: packed(x), args.calls)  # noqa: B023
            pad = per_call_ms(lambda: padded(x), args.calls)  # noqa: B023
            print(f"{rows:>4} {plain:>15.2f} {fast:>19.2f} {plain / fast:>6.2f} {pad:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
