"""JSON of bench_mla_decode.py -> PNG: fraction of measured peak read bandwidth per config,
one panel per model, one bar per latent dtype (RoPE keys bf16).

  python bench/plot.py bench/results/decode_h200.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(json_path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    rows = [r for r in data["rows"] if r["rope"] == "bf16"]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 1, figsize=(14, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mrows = [r for r in rows if r["model"] == model]
        configs = sorted({(r["D_c"], r["B"], r["S"]) for r in mrows})
        dtypes = [d for d in ("bf16", "fp8", "int8", "int4") if any(r["latent"] == d for r in mrows)]
        width = 0.8 / max(1, len(dtypes))
        for i, dt in enumerate(dtypes):
            vals = []
            for cfg in configs:
                hit = [r for r in mrows if (r["D_c"], r["B"], r["S"]) == cfg and r["latent"] == dt]
                vals.append(hit[0]["frac_peak"] if hit else 0)
            ax.bar([x + i * width for x in range(len(configs))], vals, width, label=dt)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(configs))])
        ax.set_xticklabels([f"D{d}\nB{b} S{s // 1024}k" for d, b, s in configs], fontsize=7)
        ax.set_ylabel("fraction of peak read BW")
        ax.set_title(f"mla_decode, {model} (peak {data.get('peak_read_GBps')} GB/s)")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(plot(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "decode_h200.json"))
