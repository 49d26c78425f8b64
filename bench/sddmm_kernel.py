"""How fast can the deltas' gradient (an SDDMM) get on a CPU? A hand-written kernel as the bound.

    python bench/sddmm_kernel.py          # compiles a small C++ kernel (needs g++), ~30 s once

Issue 6 asks to change the op when a target is out of reach. This compiles (with
``torch.utils.cpp_extension.load_inline``, ``-O3 -march=native``) the simplest fast SDDMM we
could write: rows of g.T and x.T in token blocks that fit in L2, four nonzeros of a row
sharing each load of g, the inner loop vectorised by the compiler. It is timed side by side
with the paths `spielft.ops.sddmm` chooses from (the dense GEMM + gather, torch's CSR sampled
matmul), with and without the two transposes it needs. Not used by the library: it is the
measurement that says whether a custom CPU kernel would be worth shipping.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from spielft.ops import csr_sddmm, dense_sddmm

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

// out[p] = sum_t gT[r, t] * xT[cols[p], t] for p in rowptr[r]..rowptr[r + 1].
torch::Tensor sddmm_transposed(torch::Tensor gT, torch::Tensor xT, torch::Tensor rowptr,
                               torch::Tensor cols, int64_t block) {
  const int64_t R = gT.size(0), T = gT.size(1);
  auto out = torch::zeros({cols.size(0)}, gT.options());
  const float* g = gT.data_ptr<float>();
  const float* x = xT.data_ptr<float>();
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t t0 = 0; t0 < T; t0 += block) {
      const int64_t tn = std::min(block, T - t0);
      for (int64_t r = r0; r < r1; ++r) {
        const float* gr = g + r * T + t0;
        int64_t p = rp[r];
        for (; p + 4 <= rp[r + 1]; p += 4) {
          const float* x0 = x + c[p] * T + t0;
          const float* x1 = x + c[p + 1] * T + t0;
          const float* x2 = x + c[p + 2] * T + t0;
          const float* x3 = x + c[p + 3] * T + t0;
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t t = 0; t < tn; ++t) {
            s0 += gr[t] * x0[t]; s1 += gr[t] * x1[t]; s2 += gr[t] * x2[t]; s3 += gr[t] * x3[t];
          }
          o[p] += s0; o[p + 1] += s1; o[p + 2] += s2; o[p + 3] += s3;
        }
        for (; p < rp[r + 1]; ++p) {
          const float* xr = x + c[p] * T + t0;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t t = 0; t < tn; ++t) s += gr[t] * xr[t];
          o[p] += s;
        }
      }
    }
  });
  return out;
}
"""

SHAPES = [(1536, 576), (576, 576)]


def median_ms(repeats: int, fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def transposes(g: torch.Tensor, x: torch.Tensor) -> None:
    """The copies the kernel needs first (g and x arrive (tokens, features) from autograd)."""
    g.T.contiguous()
    x.T.contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch x sequence (4 x 256)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.01, 0.05, 0.184])
    parser.add_argument("--block", type=int, default=1024, help="tokens per block of the kernel")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "sddmm_kernel.json")
    )
    args = parser.parse_args()
    start = time.perf_counter()
    kernel = load_inline(
        "spielft_bench_sddmm",
        cpp_sources=[KERNEL],
        functions=["sddmm_transposed"],
        extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
    )
    print(f"compiled in {time.perf_counter() - start:.0f} s; threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        g, x = torch.randn(args.tokens, out_f), torch.randn(args.tokens, in_f)
        gT, xT = g.T.contiguous(), x.T.contiguous()
        transpose_ms = median_ms(args.repeats, transposes, g, x)
        for density in args.densities:
            k = max(1, round(density * out_f * in_f))
            idx = torch.randperm(out_f * in_f)[:k].sort().values
            rowptr = torch.searchsorted(idx, torch.arange(out_f + 1) * in_f)
            cols = idx % in_f
            ref = (g.double().T @ x.double()).view(-1)[idx]
            got = kernel.sddmm_transposed(gT, xT, rowptr, cols, args.block)
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)
            shape = (out_f, in_f)
            ms = {
                "dense": median_ms(args.repeats, dense_sddmm, g, x, idx, shape),
                "csr": median_ms(args.repeats, csr_sddmm, g, x, idx, shape),
                "kernel": median_ms(
                    args.repeats, kernel.sddmm_transposed, gT, xT, rowptr, cols, args.block
                ),
            }
            ms["kernel+transposes"] = ms["kernel"] + transpose_ms
            gflops = 2 * k * args.tokens / ms["kernel"] / 1e6
            print(
                f"{out_f:>5}x{in_f:<5} {density:6.3f}  "
                + "  ".join(f"{name} {value:6.2f} ms" for name, value in ms.items())
                + f"  (kernel {gflops:.0f} GFLOP/s)",
                flush=True,
            )
            rows.append(
                {
                    "shape": [out_f, in_f],
                    "density": density,
                    "k": k,
                    "ms": ms,
                    "transposes_ms": transpose_ms,
                    "kernel_gflops": gflops,
                }
            )
    result = {
        "command": "python bench/sddmm_kernel.py",
        "tokens": args.tokens,
        "block": args.block,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
