"""The deltas' gradient (an SDDMM) on one layer: which way of computing it is fastest, by density.

    python bench/sddmm.py                     # SmolLM2-135M's linear shapes, 1024 tokens
    python bench/sddmm.py --tokens 2048 --threads 1

For each (out, in) shape and density, times side by side (interleaved, median of --repeats):

* ``csr``: ``torch.sparse.sampled_addmm`` on a CSR pattern (the sampled matmul);
* ``gather``: the (tokens,) columns of g and x at each index's row and column, multiplied and
  summed over tokens (``spielft.ops.gather_sddmm``, chunked);
* ``dense``: the full ``g.T @ x`` GEMM, then a gather of the k entries;
* ``dense-bf16``: the same with g and x cast to bfloat16 (casts included; what
  ``weight_grad_dtype="bfloat16"`` runs, checked against the float32 result to 2e-2);

and prints each one's time and the ratio to ``dense`` (and writes them to ``--output``).
`spielft.ops.sddmm` picks among them by density with the thresholds in `spielft.ops`
(``GATHER_SDDMM_DENSITY``, ``DENSE_SDDMM_DENSITY``, ``BF16_DENSE_SDDMM_DENSITY``), which come
from this script's output on the project's 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from spielft.ops import csr_sddmm, dense_sddmm, gather_sddmm

# SmolLM2-135M: q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]



def dense_bf16_sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return dense_sddmm(g.bfloat16(), x.bfloat16(), idx, shape).float()


PATHS = {"csr": csr_sddmm, "gather": gather_sddmm, "dense": dense_sddmm, "dense-bf16": dense_bf16_sddmm}
GATHER_UP_TO = 0.03  # above this the gathers cost 5-100x the GEMM: not worth the minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch x sequence (4 x 256)")
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[0.0005, 0.001, 0.003, 0.01, 0.03, 0.1, 0.184])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "sddmm.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"tokens {args.tokens}, threads {torch.get_num_threads()}; ms per call (x dense)")
    print(f"{'shape':>11} {'density':>8} " + " ".join(f"{p:>15}" for p in PATHS) + "  fastest")
    rows = []
    for out_f, in_f in SHAPES:
        g = torch.randn(args.tokens, out_f)
        x = torch.randn(args.tokens, in_f)
        for density in args.densities:
            k = max(1, round(density * out_f * in_f))
            idx = torch.randperm(out_f * in_f)[:k].sort().values
            ref = dense_sddmm(g, x, idx, (out_f, in_f))
            paths = {p: f for p, f in PATHS.items() if p != "gather" or density <= GATHER_UP_TO}
            times: dict[str, list[float]] = {p: [] for p in paths}
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    start = time.perf_counter()
                    got = fn(g, x, idx, (out_f, in_f))
                    times[name].append(time.perf_counter() - start)
                    if name == "dense-bf16":  # bf16 rounds g, x and the result
                        scale = ref.abs().max().item()
                        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * scale)
                    else:
                        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
            ms = {p: 1e3 * statistics.median(t) for p, t in times.items()}
            cells = " ".join(f"{ms[p]:7.2f} ({ms[p] / ms['dense']:4.2f})" if p in ms else f"{'-':>15}"
                             for p in PATHS)
            print(f"{out_f:>5}x{in_f:<5} {density:8.4f} {cells}  {min(ms, key=ms.get)}", flush=True)
            rows.append({"shape": [out_f, in_f], "density": density, "k": k, "ms": ms,
                         "fastest": min(ms, key=ms.get)})
    result = {"command": "python bench/sddmm.py", "tokens": args.tokens,
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "platform": platform.platform(), "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
