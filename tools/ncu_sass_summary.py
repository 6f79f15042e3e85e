"""Where a kernel's instructions go, from Nsight Compute's per-instruction (SASS) source page:
the opcode mix (share of executed warp instructions and of stall samples) and the classes of
instructions by how often they ran (once per tile and warp, twice, ...).

  ncu --clock-control none --section SourceCounters --section InstructionStats --page source \\
      --csv --print-source sass -k regex:mla_decode_kernel -c 1 --launch-skip 3 \\
      python3 bench/bench_mla_decode.py --profile --ncu > ncu_source.csv
  python tools/ncu_sass_summary.py ncu_source.csv [--kernel N]
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
from pathlib import Path


def load(path: Path) -> list[tuple[str, list[dict]]]:
    """(kernel name, per-instruction rows) of each kernel in the CSV (ncu -c N prints one
    "Kernel Name" line and one table per profiled launch)."""
    lines = path.read_text().split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith('"Kernel Name"')] or [0]
    kernels = []
    for k, first in enumerate(starts):
        last = starts[k + 1] if k + 1 < len(starts) else len(lines)
        section = lines[first:last]
        table = next((i for i, line in enumerate(section) if line.startswith('"Address"')), None)
        if table is None:
            continue
        reader = csv.DictReader(io.StringIO("\n".join(section[table:])))
        name = section[0] if section[0].startswith('"Kernel Name"') else ""
        kernels.append((name, [row for row in reader if row.get("Source")]))
    if not kernels:
        raise SystemExit(f"{path}: no per-instruction table (was ncu run with --page source?)")
    return kernels


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return 0.0


def _opcode(row: dict) -> str:
    """The instruction's opcode without its predicate and modifiers (IMAD of @P0 IMAD.WIDE)."""
    words = [w for w in row["Source"].split() if not w.startswith("@")]
    return words[0].split(".")[0] if words else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output")
    ap.add_argument("--top", type=int, default=20, help="opcodes to list")
    ap.add_argument("--min-share", type=float, default=0.01,
                    help="smallest share of the executed instructions a region listed has "
                         "(default 0.01)")
    ap.add_argument("--kernel", type=int, default=0,
                    help="which profiled launch of the CSV to summarize (0: the first)")
    args = ap.parse_args()
    kernels = load(args.csv)
    if not 0 <= args.kernel < len(kernels):
        raise SystemExit(f"--kernel {args.kernel}: {args.csv} holds {len(kernels)} launch(es)")
    kernel, rows = kernels[args.kernel]
    executed = [number(r["Instructions Executed"]) for r in rows]
    stalls = [number(r["Warp Stall Sampling (All Samples)"]) for r in rows]
    total, total_stall = sum(executed), sum(stalls) or 1.0
    print(kernel)
    print(f"{len(rows)} SASS instructions, {total:,.0f} warp instructions executed, "
          f"{total_stall:,.0f} stall samples")
    reasons = collections.Counter()  # ncu's per-reason sample columns: stall_barrier, ...
    for r in rows:
        for column, value in r.items():
            if column.startswith("stall_") and "Not Issued" not in column:
                reasons[column[len("stall_"):]] += number(value)
    if reasons:
        print("stall reasons (% of samples): " + ", ".join(
            f"{name} {100 * n / total_stall:.1f}" for name, n in reasons.most_common()
            if n >= 0.01 * total_stall))
    mix, mix_stall = collections.Counter(), collections.Counter()
    for r, n, s in zip(rows, executed, stalls):
        opcode = _opcode(r)
        mix[opcode] += n
        mix_stall[opcode] += s
    print("\nopcode      % instructions  % stall samples")
    for opcode, n in mix.most_common(args.top):
        print(f"{opcode:10s} {100 * n / total:8.1f} {100 * mix_stall[opcode] / total_stall:14.1f}")
    by_count = collections.Counter()
    sass_of = collections.Counter()
    for n in executed:
        by_count[n] += n
        sass_of[n] += 1
    print("\ntimes executed (per kernel)  SASS lines  % instructions")
    for n, share in sorted(by_count.items(), key=lambda kv: -kv[1])[:8]:
        print(f"{n:26,.0f} {sass_of[n]:11d} {100 * share / total:14.1f}")
    regions(rows, executed, stalls, total, total_stall, args.min_share)


def regions(rows, executed, stalls, total, total_stall, min_share):
    """Runs of consecutive SASS lines executed equally often (one basic block, or a few): where
    a loop body starts and ends, and what it is made of."""
    runs = []
    for i, (r, n, s) in enumerate(zip(rows, executed, stalls)):
        opcode = _opcode(r)
        if runs and runs[-1]["n"] == n:
            runs[-1]["lines"] += 1
            runs[-1]["stall"] += s
            runs[-1]["ops"][opcode] += 1
        else:
            runs.append({"first": i, "n": n, "lines": 1, "stall": s,
                         "ops": collections.Counter([opcode])})
    print(f"\nregions of >= {100 * min_share:g} % of the instructions (line: first SASS line; "
          "times: executions of each line)")
    print(" line  lines      times  % instr  % stall  opcodes")
    for g in runs:
        share = g["n"] * g["lines"] / total
        if share >= min_share:
            ops = " ".join(f"{op} {k}" for op, k in g["ops"].most_common(6))
            print(f"{g['first']:5d} {g['lines']:6d} {g['n']:10,.0f} {100 * share:8.1f} "
                  f"{100 * g['stall'] / total_stall:8.1f}  {ops}")


if __name__ == "__main__":
    main()
