"""bench/bench_e2e.py's CPU parts: arguments, merging runs and the markdown table (the
measurements need a GPU)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import bench_e2e  # noqa: E402


def _row(model, side, b, s, ms, **extra):
    return {"model": model, "side": side, "B": b, "S": s, "ms_per_step": ms,
            "tokens_per_s": b * 1e3 / ms, "prefill_s": None, "peak_GB": 20.0,
            "kv_bytes": b * s * 1000, "roofline_frac": 0.5, **extra}


def _run(tmp_path, name, model, gpu="NVIDIA H200"):
    rows = [_row(model, "original-graph", 1, 4096, 20.0), _row(model, "mla-int4", 1, 4096, 8.0),
            _row(model, "mla-int4", 40, 32768, 30.0, max_batch=True),
            {"model": model, "side": "original-eager", "B": 64, "S": 4096, "error": "OOM"}]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"metadata": {"gpu": gpu}, "rows": rows,
                                "max_batch_32k": {f"{model}/mla-int4": 40}}))
    return path


def test_merge_joins_runs_and_plots(tmp_path):
    a, b = _run(tmp_path, "a", "llama2-7b"), _run(tmp_path, "b", "llama3-8b")
    out = bench_e2e.merge([a, b], tmp_path / "out", None)
    assert out.name == "e2e_h200.json" and out.with_suffix(".png").stat().st_size > 0
    merged = json.loads(out.read_text())
    assert len(merged["rows"]) == 8 and len(merged["metadata"]["runs"]) == 2
    assert merged["max_batch_32k"] == {"llama2-7b/mla-int4": 40, "llama3-8b/mla-int4": 40}
    again = bench_e2e.merge([out, _run(tmp_path, "d", "smollm2")], tmp_path / "again", None)
    merged = json.loads(again.read_text())
    assert len(merged["metadata"]["runs"]) == 3 and "runs" not in merged["metadata"]["runs"][0]
    assert len(merged["rows"]) == 12
    with pytest.raises(SystemExit, match="different GPUs"):
        bench_e2e.merge([a, _run(tmp_path, "c", "llama3-8b", gpu="NVIDIA H100")], tmp_path, None)


def test_table_gives_speedups_over_the_original_graph(tmp_path):
    text = bench_e2e.table(json.loads(_run(tmp_path, "a", "llama2-7b").read_text()))
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert "| mla-int4 | 1 | 4096 | 8.00 | 125 | 2.50x |" in text
    assert "(largest B)" in text and "OOM" in text


def test_arguments_are_checked():
    args = bench_e2e.parse_args(["--models", "llama2-7b", "--rows", "1x8,2x16"])
    assert args.rows == [(1, 8), (2, 16)] and args.models == ["llama2-7b"]
    for bad in (["--models", "gpt2"], ["--sides", "mla-int3"], ["--rows", "1by8"]):
        with pytest.raises(SystemExit):
            bench_e2e.parse_args(bad)
    assert bench_e2e.gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert bench_e2e.gpu_tag(None) == "gpu"
    assert bench_e2e.gpu_tag("NVIDIA H200") == "h200"
