"""Time x @ Wt for the decoding products' shapes and a few row counts (Wt a contiguous (in, out) fp32
copy): the cost of verifying several tokens against one on this CPU.

    python benchmarks/skinny_matmul.py [threads]
"""

import sys
import time

import torch


def mean_us(f, reps: int = 200) -> float:
    for _ in range(10):
        f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e6


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    rows = [1, 2, 4, 8, 16]
    print(f"{threads} threads; microseconds per call for rows = {rows}")
    for d_in, d_out in [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 4096)]:
        wt = torch.randn(d_out, d_in).t().contiguous()
        times = [mean_us(lambda x=torch.randn(m, d_in): x @ wt) for m in rows]
        print(f"{d_in:5d} -> {d_out:5d}: " + "  ".join(f"{t:7.1f}" for t in times))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
