"""Draw a GPU benchmark's results (the JSON of ``gpu_bench.py --json``) as a PNG.

One panel per case (forward ``sum``, forward+backward ``batchmean``): GB/s of
input read per implementation, with the device's measured copy bandwidth as a
dashed line, each bar labelled with its share of that bandwidth. The title names
the device, the PyTorch version, and the command and commit of the result's stamp.

Usage::

    python benchmarks/plot_gpu.py benchmarks/results/gpu-h100.json docs/img/benchmarks-gpu-h100.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], path: Path) -> None:
    """Write the bar chart of ``result`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in result["results"]))
    roof = result["copy_bandwidth_gbps"]
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), sharey=True)
    for ax, case in zip(axes, cases, strict=True):
        rows = [r for r in result["results"] if r["case"] == case]
        names = [r["implementation"].replace(" (", "\n(") for r in rows]
        bars = ax.bar(range(len(rows)), [r["gbps"] for r in rows], color="tab:blue")
        for bar, r in zip(bars, rows, strict=True):
            ax.annotate(
                f"{100 * r['fraction_of_copy_bandwidth']:.0f}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
        ax.axhline(roof, color="k", ls="--", lw=1, label=f"copy bandwidth {roof:.0f} GB/s")
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_title(case)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("GB/s of input read (two operands)")
    rows_, cols_ = result["shape"]
    title = f"{result['device']}, {rows_}x{cols_} float32, torch {result['torch']}"
    stamp = result.get("stamp") or {}
    if stamp:
        title += f"\n{stamp.get('command')} at commit {str(stamp.get('commit'))[:12]}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Read the JSON, write the PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    plot(json.loads(args.json.read_text()), args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
