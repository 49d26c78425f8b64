"""Would a structured index set make the deltas' gradient cheap enough for issue 6's targets?

    python bench/sddmm_blocks.py          # SmolLM2-135M's linear shapes, 1024 tokens

At LoRA r=64's parameter count (18.4% of every matrix of SmolLM2-135M) SpIEL's deltas' gradient
is the dense weight-gradient GEMM plus a gather (`bench/sddmm.py`, `bench/sddmm_kernel.py`): no
unstructured SDDMM beats it. This script asks what a change of method would buy: the same
gradient when the trainable entries come in square b x b blocks (b = 16, 32, 64) or whole
input columns, at the same density. Interleaved, median of --repeats, each path checked
against the dense reference:

* ``dense``: ``g.T @ x`` (what SpIEL pays today at this density);
* ``unstructured``: `spielft.ops.sddmm` on random positions (its fastest path at the density);
* ``blocks{b}``: the better of two layouts, a batched matmul over gathered (b, tokens) x
  (tokens, b) blocks, and one GEMM per column block over the gathered rows of its blocks;
* ``columns``: ``g.T @ x[:, cols]``, one GEMM over the chosen input columns.

It prints per-shape times and the sum over SmolLM2-135M's 30 layers (2 q/o-shaped, 2 k/v,
2 gate/up, 1 down matrices each): seconds of weight gradient per training step, to set
against the step times in `bench/speed.py`'s table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from spielft.ops import sddmm

# SmolLM2-135M per layer: (out, in) and how many matrices of that shape.
SHAPES = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}
LAYERS = 30
BLOCKS = (16, 32, 64)


def block_gradient_bmm(g: Tensor, x: Tensor, rows: Tensor, cols: Tensor, b: int) -> Tensor:
    """(n, b, b) gradients of the blocks at (rows[i], cols[i]) as one batched matmul."""
    tokens = g.shape[0]
    gb = g.view(tokens, -1, b).index_select(1, rows).permute(1, 2, 0)  # (n, b, tokens)
    xb = x.view(tokens, -1, b).index_select(1, cols).permute(1, 0, 2)  # (n, tokens, b)
    return torch.bmm(gb, xb)


def column_groups(rows: Tensor, cols: Tensor) -> list[tuple[int, Tensor]]:
    """The blocks grouped by column block: [(column block, its row blocks)], in column order."""
    order = torch.argsort(cols * (int(rows.max()) + 1) + rows)
    rows, cols = rows[order], cols[order]
    groups, start = [], 0
    for col, n in enumerate(torch.bincount(cols).tolist()):
        if n:
            groups.append((col, rows[start : start + n]))
        start += n
    return groups


def block_gradient_grouped(g: Tensor, x: Tensor, groups: list[tuple[int, Tensor]], b: int) -> Tensor:
    """The same blocks (in column-group order) as one (n_c * b, tokens) x (tokens, b) GEMM each."""
    tokens = g.shape[0]
    gv = g.view(tokens, -1, b)
    parts = [
        gv.index_select(1, rows).reshape(tokens, -1).T @ x[:, col * b : (col + 1) * b]
        for col, rows in groups
    ]
    return torch.cat(parts).view(-1, b, b)


def timed(paths: dict[str, Callable[[], Tensor]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure(out_f: int, in_f: int, density: float, tokens: int, repeats: int) -> dict[str, float]:
    g, x = torch.randn(tokens, out_f), torch.randn(tokens, in_f)
    dense = g.T @ x
    k = round(density * out_f * in_f)
    idx = torch.randperm(out_f * in_f)[:k].sort().values
    torch.testing.assert_close(sddmm(g, x, idx, (out_f, in_f)), dense.view(-1)[idx],
                               rtol=1e-4, atol=1e-3)
    paths: dict[str, Callable[[], Tensor]] = {
        "dense": lambda: g.T @ x,
        "unstructured": lambda: sddmm(g, x, idx, (out_f, in_f)),
    }
    for b in BLOCKS:
        grid_cols = in_f // b
        n = max(1, round(density * (out_f // b) * grid_cols))
        sel = torch.randperm((out_f // b) * grid_cols)[:n].sort().values
        rows, cols = sel // grid_cols, sel % grid_cols
        groups = column_groups(rows, cols)
        blocks = dense.view(out_f // b, b, grid_cols, b)
        want = blocks[rows, :, cols, :]  # (n, b, b), in row-major block order
        torch.testing.assert_close(block_gradient_bmm(g, x, rows, cols, b), want,
                                   rtol=1e-4, atol=1e-3)
        grouped_rows = torch.cat([r for _, r in groups])
        grouped_cols = torch.cat([torch.full_like(r, c) for c, r in groups])
        torch.testing.assert_close(block_gradient_grouped(g, x, groups, b),
                                   blocks[grouped_rows, :, grouped_cols, :], rtol=1e-4, atol=1e-3)
        paths[f"blocks{b}_bmm"] = lambda r=rows, c=cols, b=b: block_gradient_bmm(g, x, r, c, b)
        paths[f"blocks{b}_grouped"] = lambda gr=groups, b=b: block_gradient_grouped(g, x, gr, b)
    chosen = torch.randperm(in_f)[: max(1, round(density * in_f))].sort().values
    torch.testing.assert_close(g.T @ x.index_select(1, chosen), dense[:, chosen],
                               rtol=1e-4, atol=1e-3)
    paths["columns"] = lambda: g.T @ x.index_select(1, chosen)
    ms = timed(paths, repeats)
    for b in BLOCKS:
        ms[f"blocks{b}"] = min(ms.pop(f"blocks{b}_bmm"), ms.pop(f"blocks{b}_grouped"))
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="batch x sequence (4 x 256)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.184, 0.05, 0.01])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output",
                        default=str(Path(__file__).parent / "results" / "sddmm_blocks.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    columns = ["dense", "unstructured", *(f"blocks{b}" for b in BLOCKS), "columns"]
    print(f"tokens {args.tokens}, threads {torch.get_num_threads()}; ms per call (x dense)")
    rows, totals = [], []
    for density in args.densities:
        step = dict.fromkeys(columns, 0.0)
        for (out_f, in_f), count in SHAPES.items():
            ms = measure(out_f, in_f, density, args.tokens, args.repeats)
            print(f"{out_f:>5}x{in_f:<5} {density:6.3f} "
                  + " ".join(f"{c}={ms[c]:.2f}({ms[c] / ms['dense']:.2f})" for c in columns),
                  flush=True)
            rows.append({"shape": [out_f, in_f], "density": density, "ms": ms})
            for c in columns:
                step[c] += ms[c] * count * LAYERS / 1e3
        print(f"  per step ({LAYERS} layers), seconds: "
              + " ".join(f"{c}={step[c]:.2f}" for c in columns), flush=True)
        totals.append({"density": density, "seconds_per_step": step})
    result = {"command": "python bench/sddmm_blocks.py", "tokens": args.tokens,
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "platform": platform.platform(), "rows": rows, "per_step": totals}
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
