"""Time the decoding products' shapes for a few row counts, three ways, with the weights cold (a
rotation over enough copies to overflow the caches, as in a decoding step that reads ~20 MB of weights)
and hot (one copy, reused):

- ``x @ Wt``: Wt a contiguous (in, out) fp32 copy (MKL; one row takes its matrix-vector path);
- ``F.linear``: W as stored, (out, in);
- ``oneDNN``: ``torch.ops.mkldnn._linear_pointwise`` over a weight reordered once with
  ``torch.ops.mkldnn._reorder_linear_weight`` (what ``model/fastpath.py`` uses for 2-256 rows);
- ``int8``: fbgemm's dynamic int8 linear over a per-row int8 copy (``fastpath.project_int8``'s fallback
  for speculative drafts; approximate);
- ``native``: this project's kernel (``model/native.py``, ``fewrow.cpp``) over a packed fp32 copy, the
  path ``fastpath.project`` takes for up to 64 rows;
- ``native int8``: the same kernel over an int8 copy (``fastpath.project_int8``'s path for drafts).

    python benchmarks/skinny_matmul.py [threads]

Prints the median microseconds per call.
"""

import sys
import time

import torch
import torch.nn.functional as F

from mtp_lightning.model import native
from mtp_lightning.model.fastpath import _pack_int8


def median_us(f, reps: int = 200) -> float:
    for _ in range(10):
        f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e6


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    rows = [1, 4, 16]
    if native.kernel() is None:
        sys.exit(f"the native kernel is not available: {native.why_not()}")
    print(f"{threads} threads; median microseconds per call")
    print(f"| in -> out | weights | {' | '.join(f'{m} rows: x @ Wt / F.linear / oneDNN / int8 / native / native int8' for m in rows)} |")
    print(f"| --- | --- | {' | '.join('---' for _ in rows)} |")
    with torch.inference_mode():
        for d_in, d_out in [(256, 768), (1024, 256), (256, 4096)]:
            for temp in ("cold", "hot"):
                copies = max(1, int(48e6 / (d_in * d_out * 4))) if temp == "cold" else 1
                ws = [torch.randn(d_out, d_in) for _ in range(copies)]
                wts = [w.t().contiguous() for w in ws]
                dnn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
                q8 = [_pack_int8(w) for w in ws]
                fr = [native.pack(w) for w in ws]
                n8 = [native.pack_q8(w) for w in ws]
                cells = []
                for m in rows:
                    x = torch.randn(m, d_in)
                    i = [0]

                    def nxt() -> int:
                        i[0] = (i[0] + 1) % copies
                        return i[0]
                    t = [median_us(lambda: x @ wts[nxt()]), median_us(lambda: F.linear(x, ws[nxt()])),
                         median_us(lambda: torch.ops.mkldnn._linear_pointwise(x, dnn[nxt()], None, "none", [], "")),
                         median_us(lambda: torch.ops.quantized.linear_dynamic(x, q8[nxt()], True)),
                         median_us(lambda: native.linear(x, fr[nxt()], None, d_out)),
                         median_us(lambda: native.linear_q8(x, n8[nxt()], d_out))]
                    cells.append(" / ".join(f"{v:.0f}" for v in t))
                print(f"| {d_in} -> {d_out} | {temp} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
