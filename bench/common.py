"""Shared benchmark machinery: CUDA-event timing with the L2 flushed, the measured peak read
bandwidth, and a JSON writer that records where and with what the numbers were taken (and its
reader for runs that add rows to an earlier JSON)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# Larger than the H200's 60 MB L2 (and the H100's 50 MB), so one write evicts everything.
L2_FLUSH_BYTES = 256 * 2**20


class Timer:
    """Median of CUDA-event timings of ``fn`` with the L2 flushed before every call.

    flush="write" zeroes a buffer larger than L2, which leaves L2 full of dirty lines that the
    timed call's misses then write back to memory; flush="read" sums the buffer instead, which
    evicts as much and leaves only clean lines (no write-back inside the timed call)."""

    FLUSHES = ("write", "read")

    def __init__(self, warmup: int = 5, repeat: int = 50, flush: str = "write"):
        if flush not in self.FLUSHES:
            raise ValueError(f"flush must be one of {self.FLUSHES}, got {flush!r}")
        self.warmup, self.repeat, self.flush = warmup, repeat, flush
        self._flush = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")

    def flush_l2(self):
        if self.flush == "write":
            self._flush.zero_()
        else:
            self._flush.sum()

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeat)]
        for s, e in zip(starts, ends):
            self.flush_l2()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times_us = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
        return {"median_us": statistics.median(times_us),
                "p20_us": times_us[len(times_us) // 5],
                "p80_us": times_us[(4 * len(times_us)) // 5]}


def eval_batch_size(device) -> int:
    """Perplexity windows per forward pass: 8 on a GPU (fewer launches and syncs), 1 on a CPU
    (where batching is slower, mla_ext.eval.perplexity)."""
    return 8 if torch.device(device).type == "cuda" else 1


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up call): its replay, which is what a decode step
    captured in a graph pays, without the host's launch overhead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def measure_timer_floor(timer: Timer) -> float:
    """Microseconds the timer reports for a graph holding one kernel that does next to nothing
    (a one-element add) after the same L2 flush: the part of every small time that is the
    graph launch, the events and the flush's write-backs rather than the op."""
    x = torch.zeros(1, device="cuda")
    return timer(graphed(lambda: x.add_(1.0)))["median_us"]


def measure_peak_read_bandwidth(nbytes: int = 4 * 2**30, timer: Timer | None = None) -> float:
    """Bytes per second of the fastest plain read the device sustains: a sum over a large
    buffer (reads only; the result is a few bytes). The ceiling used for '% of peak'."""
    timer = timer or Timer(warmup=3, repeat=20)
    buf = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    t = timer(lambda: buf.sum(dtype=torch.float32))
    copy_dst = torch.empty_like(buf)
    t_copy = timer(lambda: copy_dst.copy_(buf))
    read_bw = nbytes / (t["median_us"] * 1e-6)
    copy_bw = 2 * nbytes / (t_copy["median_us"] * 1e-6)  # read + write
    del buf, copy_dst
    return max(read_bw, copy_bw)


def _git_commit() -> str:
    # A copy of the working tree can carry stale git metadata: MLA_EXT_COMMIT names the commit.
    if os.environ.get("MLA_EXT_COMMIT"):
        return os.environ["MLA_EXT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       cwd=Path(__file__).parent, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata() -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "host": platform.node(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, rows: list[dict], extra: dict | None = None,
                  out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (default bench/results) with metadata and rows."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"metadata": metadata(), **(extra or {}), "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def earlier_results(path: Path, protocol: dict, keys, option: str) -> dict | None:
    """The JSON a study wrote at ``path`` before (None if there is none), after checking that it
    was measured as ``protocol`` is on each of ``keys``; ``option`` (the flag that asked for it)
    names the error."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        earlier = json.loads(path.read_text())
        their = earlier["protocol"]
        earlier["rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{option}: {path} is not a study JSON ({e})") from None
    for key in keys:
        if their.get(key) != protocol[key]:
            raise SystemExit(f"{option}: {path} was measured with another {key!r}: "
                             f"{their.get(key)} there, {protocol[key]} now")
    return earlier
