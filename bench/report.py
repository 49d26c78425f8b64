"""Markdown tables and plots from bench/results/*.json (what the README shows).

    python bench/report.py        # prints the tables, writes bench/results/speed_density.png
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"
NAMES = {"floor": "floor (no weight gradient)", "lora": "peft LoRA", "shira": "peft SHiRA",
         "full": "full fine-tuning (AdamW)", "spiel-ag": "SpIEL-AG", "spiel-ma": "SpIEL-MA",
         "spiel-ag-bf16": "SpIEL-AG, bf16 weight gradient", "spiel-ma-bf16": "SpIEL-MA, bf16 weight gradient"}
NAMES.update({f"spiel-{r}-{s}": f"SpIEL-{r.upper()}, whole {s}"
              for r in ("ag", "ma") for s in ("rows", "columns")})
NAMES.update({f"{m}-applied": f"{NAMES[m]}, inside applied_deltas()"
              for m in list(NAMES) if m.startswith("spiel")})


def per_round_ratio(row: dict, lora: dict | None) -> float | None:
    """Median over rounds of this method's step over the same round's step of ``lora`` (or of
    another baseline): robust to a round that another tenant slowed, which a cycle mean
    (SpIEL-AG's) is not."""
    steps, base = row.get("all_step_seconds"), (lora or {}).get("all_step_seconds")
    if not steps or not base or len(steps) != len(base):
        return None
    return statistics.median(a / b for a, b in zip(steps, base, strict=True))


def speed_tables(result: dict) -> str:
    rows = result["at_lora_budget"]["methods"]
    lines = [f"{result['model']}, batch {result['batch'][0]} x {result['batch'][1]}, "
             f"{result['at_lora_budget']['budget']:,} trainable parameters (LoRA r={result['rank']}'s count); "
             f"`{result['command']}`", "",
             "| method | step (s) | x LoRA | x LoRA, per-round median | x floor | x floor, per-round median "
             "| peak RSS (MiB) | state B/param |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "-"
        paired = per_round_ratio(row, rows.get("lora"))
        paired_floor = per_round_ratio(row, rows.get("floor"))
        lines.append(f"| {NAMES.get(name, name)} | {row['step_seconds']:.2f} | {row.get('ratio_to_lora', 0):.2f} | "
                     f"{_fmt(paired)} | {row.get('ratio_to_floor', 0):.2f} | {_fmt(paired_floor)} | "
                     f"{rss} | {row['state_bytes_per_param']:.1f} |")
    if "by_density" in result:
        lines += ["", "| density | budget | floor (s) | LoRA (s) | SpIEL-AG (s) | SpIEL-MA (s) | MA x floor | MA x LoRA | AG x LoRA |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for density, block in result["by_density"].items():
            m = block["methods"]
            lines.append(
                f"| {100 * float(density):g}% | {block['budget']:,} | {m['floor']['step_seconds']:.2f} | "
                f"{m['lora']['step_seconds']:.2f} | {m['spiel-ag']['step_seconds']:.2f} | "
                f"{m['spiel-ma']['step_seconds']:.2f} | {m['spiel-ma']['ratio_to_floor']:.2f} | "
                f"{m['spiel-ma']['ratio_to_lora']:.2f} | {m['spiel-ag']['ratio_to_lora']:.2f} |")
    return "\n".join(lines)


def density_plot(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for result in results:
        if "by_density" not in result:
            continue
        densities = sorted(result["by_density"], key=float)
        first = densities[0]
        targeted = result["by_density"][first]["budget"] / float(first)
        main = result["at_lora_budget"]
        xs = [100 * float(d) for d in densities] + [100 * main["budget"] / targeted]
        for method, style in (("floor", "k--"), ("lora", "s-"), ("spiel-ag", "o-"), ("spiel-ma", "^-")):
            blocks = [result["by_density"][d] for d in densities] + [main]
            kept = [i for i, block in enumerate(blocks) if method in block["methods"]]
            if not kept:
                continue
            # Runs differ in how the methods shared processes (see bench/speed.py): say which.
            shared = result.get("processes", "one") == "one"
            label = (f"{NAMES[method]} ({'one process' if shared else 'a process each'})"
                     if len(results) > 1 else NAMES[method])
            ax.plot([xs[i] for i in kept], [blocks[i]["methods"][method]["step_seconds"] for i in kept],
                    style, label=label, alpha=0.45 if shared else 1.0)
    ax.set_xscale("log")
    ax.set_xlabel("SpIEL density: trainable share of the targeted weights (%)")
    ax.set_ylabel("step time (s)")
    ax.set_title("Step time against SpIEL density (LoRA: r=64 throughout)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _width(result: dict) -> int:
    return int(result["model"].split("-h")[1].split("-")[0])


def width_section(results: list[dict], path: Path) -> str:
    """Synthetic Llamas of growing width: a table per harness (one process for all methods, or
    a process each) and one plot of step time relative to the floor, the harnesses labelled."""
    harnesses: dict[str, list[dict]] = {}
    for result in sorted(results, key=_width):
        harnesses.setdefault(result.get("processes", "one"), []).append(result)
    tables = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for processes, runs in harnesses.items():
        shared = processes == "one"
        widths = [_width(r) for r in runs]
        harness = "all methods in one process" if shared else "a process per method"
        lines = [f"`{runs[0]['command']}` (for each --hidden; {harness}), batch {runs[0]['batch'][0]} x "
                 f"{runs[0]['batch'][1]}, SpIEL at LoRA r={runs[0]['rank']}'s count", "",
                 "| hidden | budget | floor (s) | LoRA (s) | SpIEL-AG (s) | SpIEL-MA (s) | MA x floor | MA x LoRA "
                 "| AG x LoRA (cycle mean) | AG x LoRA (per-round median) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for method, style in (("lora", "s-"), ("spiel-ag", "o-"), ("spiel-ma", "^-")):
            label = f"{NAMES[method]} ({'one process' if shared else 'a process each'})"
            ax.plot(widths, [r["at_lora_budget"]["methods"][method]["ratio_to_floor"] for r in runs],
                    style, label=label if len(harnesses) > 1 else NAMES[method],
                    alpha=0.45 if shared and len(harnesses) > 1 else 1.0)
        for width, r in zip(widths, runs, strict=True):
            m = r["at_lora_budget"]["methods"]
            lines.append(f"| {width} | {r['at_lora_budget']['budget']:,} | {m['floor']['step_seconds']:.2f} | "
                         f"{m['lora']['step_seconds']:.2f} | {m['spiel-ag']['step_seconds']:.2f} | "
                         f"{m['spiel-ma']['step_seconds']:.2f} | {m['spiel-ma']['ratio_to_floor']:.2f} | "
                         f"{m['spiel-ma']['ratio_to_lora']:.2f} | {m['spiel-ag']['ratio_to_lora']:.2f} | "
                         f"{_fmt(per_round_ratio(m['spiel-ag'], m['lora']))} |")
        tables.append("\n".join(lines))
    ax.axhline(1.0, color="k", linestyle="--", label="floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden size (synthetic 2-layer Llama)")
    ax.set_ylabel("step time / floor")
    ax.set_title(f"Cost against width (SpIEL at LoRA r={results[0]['rank']}'s count)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "\n\n".join(tables)


def main() -> None:
    speed = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("speed_*.json"))]
    synthetic = [r for r in speed if r["model"].startswith("synthetic")]
    for result in speed:
        if result not in synthetic:
            print(speed_tables(result), "\n")
    # The plot's LoRA is r=64 throughout: runs at another rank (speed_low_density) stay out.
    at_r64 = [r for r in speed if r not in synthetic and r["rank"] == 64]
    if at_r64:
        density_plot(at_r64, RESULTS / "speed_density.png")
    if synthetic:
        print(width_section(synthetic, RESULTS / "speed_width.png"), "\n")
    memory = RESULTS / "memory.json"
    if memory.exists():
        data = json.loads(memory.read_text())
        print(f"`{data['command']}`\n\n| base | method | trainable params | peak RSS (MiB) | state B/param |\n|---|---|---|---|---|")
        for row in data["rows"]:
            print(f"| {row['base']} | {NAMES.get(row['method'], row['method'])} | {row['trainable_params']:,} | "
                  f"{row['peak_rss_mib']:.0f} | {row['state_bytes_per_param']:.1f} |")
        print()
    size = RESULTS / "adapter_size.json"
    if size.exists():
        data = json.loads(size.read_text())
        print(f"`{data['command']}`\n\n| adapter | trainable params | file (MB) | bytes/param | x LoRA |\n|---|---|---|---|---|")
        for name, row in data["rows"].items():
            print(f"| {name} | {row['params']:,} | {row['bytes'] / 1e6:.2f} | {row['bytes_per_param']:.2f} | "
                  f"{row['ratio_to_lora']:.2f} |")


if __name__ == "__main__":
    main()
