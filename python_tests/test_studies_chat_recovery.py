"""studies/chat_recovery.py: arguments, help, and the whole recipe on CPU with tiny settings."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "chat_recovery.py"
sys.path.insert(0, str(ROOT))

from studies import chat_recovery  # noqa: E402


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "0"], "--steps"),
    (["--chat-mix", "0"], "--chat-mix"),
    (["--chat-mix", "1.5"], "--chat-mix"),
    (["--distill", "-0.1"], "--distill"),
    (["--chat-prompts", "many"], "--chat-prompts"),
    (["--cache-dtype", "int3"], "--cache-dtype"),
    (["--shakespeare", "/nonexistent/tinyshakespeare.txt"], "--shakespeare"),
])
def test_bad_arguments_are_named(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        chat_recovery.parse_args(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_defaults_and_help():
    args = chat_recovery.parse_args([])
    assert (args.steps, args.seq_len, args.batch_size, args.chat_mix, args.distill) == \
        (400, 1024, 8, 0.5, 0.5)
    result = subprocess.run([sys.executable, str(STUDY), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for fragment in ("--steps", "--chat-mix", "--distill", "8 of the 10 demo prompts", "1.3x"):
        assert fragment in result.stdout


@pytest.mark.slow
def test_study_runs_on_cpu(tmp_path):
    shakespeare = tmp_path / "shakespeare.txt"
    shakespeare.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30)
    out = tmp_path / "study.json"
    argv = ["--steps", "1", "--seq-len", "64", "--batch-size", "2", "--chat-prompts", "2",
            "--chat-max-new-tokens", "4", "--chat-cache", str(tmp_path / "cache"),
            "--calib-sequences", "1", "--eval-tokens", "128", "--context", "64",
            "--shakespeare", str(shakespeare), "--shakespeare-tokens", "128", "--device", "cpu",
            "--quiet", "--out", str(out), "--work", str(tmp_path / "work")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(STUDY), *argv], capture_output=True, text=True,
                            timeout=1200, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    rows = {r["model"].split(" (")[0]: r for r in data["rows"]}
    assert list(rows) == ["original", "original fine-tuned on the same tokens",
                          "converted, training-free", "converted, recovered"]
    for r in rows.values():
        assert set(r["ppl"]) == {"pydoc", "shakespeare"}
        assert all(math.isfinite(v) and v > 1 for v in r["ppl"].values())
    # the default's byte budget: -81.25 %, filled from below within a few bytes
    budget = rows["original"]["cache_bytes_per_token_layer"] * 0.1875
    assert 0.95 * budget <= rows["converted, training-free"]["cache_bytes_per_token_layer"] <= budget
    assert len(rows["original"]["answers"]) == 10
    assert all(r["train"]["steps"] == 1 for r in (rows["converted, recovered"],
                                                    rows["original fine-tuned on the same "
                                                         "tokens"]))
    verdict = data["verdict"]
    assert verdict["total"] == 10 and verdict["min_matches"] == 8
    assert verdict["passed"] == (verdict["answers_pass"] and verdict["ppl_pass"])
    assert verdict["ppl_ratio"]["pydoc"] == pytest.approx(
        rows["converted, recovered"]["ppl"]["pydoc"]
        / rows["original fine-tuned on the same tokens"]["ppl"]["pydoc"])
    assert data["protocol"]["train"]["chat_mix"] == 0.5
    assert "with 50% of the tokens from 2 chat answers" in data["protocol"]["train"]["data"]
    assert set(data["phases_s"]) >= {"chat data", "recover the converted model", "check"}
    assert "recovery check:" in result.stdout
