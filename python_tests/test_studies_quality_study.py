"""studies/quality_study.py: --render (JSON -> markdown tables), --resume (a cut run continues),
and the commit the benchmark JSONs record."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from studies import quality_study  # noqa: E402


def _row(section, ppl, **cfg):
    config = None if section == "original" else {
        "rope_strategy": "rotation", "rope_pairs": 4, "d_kv": None, "svd": "activation-score",
        "cache_ratio": None, **cfg}
    return {"section": section, "config": config, "ppl": ppl, "cache_dtype": None,
            "bytes_per_token_layer": 768.0 if cfg.get("d_kv") is None else 144.0}


def test_render_prints_tables_and_writes_only_where_asked(tmp_path):
    data = {"metadata": {"gpu": None, "timestamp": "t", "git_commit": "abc"},
            "protocol": {"context": 512, "stride": 512, "calibration": "c",
                         "texts": {"pydoc": "all"}, "command": "python studies/quality_study.py"},
            "rows": [_row("original", {"pydoc": 10.0}),
                     _row("partial_rope", {"pydoc": 20.0}),
                     _row("low_rank", {"pydoc": 55.0}, d_kv=16, svd="joint")]}
    out = tmp_path / "q.json"
    out.write_text(json.dumps(data))
    result = subprocess.run([sys.executable, str(ROOT / "studies" / "quality_study.py"), "--render",
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # partial RoPE alone has no factorization: its label names no SVD
    assert "| rotation r=4 d_kv=full | 768 | 20.00 (2.0x) |" in lines
    assert "| rotation r=4 joint d_kv=16 | 144 | 55.00 (5.5x) |" in lines
    assert list(tmp_path.iterdir()) == [out]
    doc = tmp_path / "tables.md"
    quality_study.main(["--render", "--out", str(out), "--doc", str(doc)])
    assert doc.read_text() == result.stdout


def test_metadata_commit_can_be_named(monkeypatch):
    monkeypatch.setenv("MLA_EXT_COMMIT", "feedbee")
    assert common.metadata()["git_commit"] == "feedbee"
    monkeypatch.delenv("MLA_EXT_COMMIT")
    assert common.metadata()["git_commit"] != "feedbee"


def _quick_study(tmp_path, *extra, expect_rc=0):
    out = tmp_path / "quick.json"
    argv = [sys.executable, str(ROOT / "studies" / "quality_study.py"), "--quick", "--device", "cpu",
            "--max-tokens", "192", "--shakespeare-tokens", "192", "--context", "64",
            "--calib-sequences", "1", "--quiet", "--out", str(out), *extra]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == expect_rc, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_resume_measures_only_the_missing_rows(tmp_path):
    out, _ = _quick_study(tmp_path)
    full = json.loads(out.read_text())
    assert len(full["rows"]) > 5
    cut = {**full, "rows": full["rows"][:-3]}  # as if the time limit had struck
    out.write_text(json.dumps(cut))
    _, result = _quick_study(tmp_path, "--resume")
    resumed = json.loads(out.read_text())
    # the kept rows as they were, the missing ones measured again (and printed), in order
    assert [r["config"] for r in resumed["rows"]] == [r["config"] for r in full["rows"]]
    assert resumed["rows"][:-3] == full["rows"][:-3]
    for again, first in zip(resumed["rows"][-3:], full["rows"][-3:]):
        assert again["ppl"] == pytest.approx(first["ppl"], rel=1e-6)
    assert len(result.stdout.strip().splitlines()) == 3 + 1  # three rows and "wrote ..."
    # rows of another protocol are not mixed in
    _, result = _quick_study(tmp_path, "--resume", "--calib-sequences", "2", expect_rc=1)
    assert "--resume" in result.stderr and "'calibration'" in result.stderr
