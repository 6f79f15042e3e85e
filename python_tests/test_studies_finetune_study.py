"""studies/finetune_study.py (recovery fine-tuning study) on CPU with tiny settings, and the two
hooks of the training loop it relies on (on_step, save_at_end)."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "finetune_study.py"
sys.path.insert(0, str(ROOT))

from studies import finetune_study  # noqa: E402
from mla_ext.train import TrainConfig, finetune, list_checkpoints, read_log  # noqa: E402
from test_train_data import REPEAT, char_tokenizer  # noqa: E402
from tiny import converted, tiny_model  # noqa: E402

SMALL = dict(seq_len=16, batch_size=2, lr=3e-3, warmup=0.2, decay=0.3, progress=False,
             plot=False)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(REPEAT)
    return path


def test_on_step_sees_every_step_and_can_stop_the_run(tmp_path, text):
    seen = []

    def on_step(record, model):
        seen.append((record["step"], model.training))
        return record["step"] == 3

    model = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4)
    history = finetune(model, char_tokenizer(), text, TrainConfig(steps=6, **SMALL),
                       tmp_path / "run", on_step=on_step)
    assert seen == [(1, True), (2, True), (3, True)]
    assert [r["step"] for r in history] == [1, 2, 3] == [r["step"] for r in read_log(
        tmp_path / "run")]
    # stopped like stop_after: a checkpoint to resume from, no final model
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert not (tmp_path / "run" / "final").exists()
    resumed = finetune(converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4),
                       char_tokenizer(), text, TrainConfig(steps=6, resume="latest", **SMALL),
                       tmp_path / "run")
    straight = finetune(converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4),
                        char_tokenizer(), text, TrainConfig(steps=6, **SMALL), tmp_path / "b")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_save_at_end_false_writes_only_the_periodic_checkpoints(tmp_path, text):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = finetune(model, char_tokenizer(), text,
                       TrainConfig(steps=5, save_every=2, save_at_end=False, **SMALL),
                       tmp_path / "run")
    assert len(history) == 5
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002",
                                                                 "step_00000004"]
    assert not (tmp_path / "run" / "final").exists()
    # the trained model stays in memory
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("argv, fragment", [
    (["--configs", "original,paper_dkv12"], "--configs"),
    (["--configs", "ours_cache8,ours_cache8"], "--configs"),
    (["--configs", "ours_dkv8"], "--configs"),
    (["--tokens", "100", "--seq-len", "64", "--batch-size", "2"], "--tokens"),
    (["--tokens", "lots"], "--tokens"),
    (["--time-limit", "0"], "--time-limit"),
    (["--shakespeare", "/nonexistent/tinyshakespeare.txt"], "--shakespeare"),
    (["--eval-every", "0"], "--eval-every"),
])
def test_bad_arguments_are_named(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune_study.parse_args(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_configs_are_the_papers_and_the_default_method():
    import mla_ext

    assert finetune_study.study_config("original", 64) is None
    paper = finetune_study.study_config("paper_dkv8", 64)
    assert (paper.rope_strategy, paper.rope_pairs, paper.svd, paper.d_kv) == ("2-norm", 4,
                                                                                "joint", 8)
    default = mla_ext.MLAConfig()
    for d in (8, 16, 32):
        ours = finetune_study.study_config(f"ours_cache{d}", 64)
        assert (ours.rope_strategy, ours.svd) == (default.rope_strategy, default.svd)
        # the same cache bytes per token as the paper's config: 2 r + d_kv of 2 d_h per KV head
        assert ours.cache_ratio == (2 * 4 + d) / (2 * 64)
    assert finetune_study.study_config("ours_cache16", 64) == default


def test_help_explains_the_study():
    result = subprocess.run([sys.executable, str(STUDY), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for fragment in ("paper_dkv", "--time-limit", "--shakespeare", "perplexity"):
        assert fragment in result.stdout


def _study(tmp_path, *extra, expect_rc=0):
    shakespeare = tmp_path / "shakespeare.txt"
    shakespeare.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n"
                           "All:\nSpeak, speak.\n" * 30)
    out = tmp_path / "study.json"
    argv = ["--seq-len", "32", "--batch-size", "2", "--context", "64", "--eval-tokens", "128",
            "--shakespeare", str(shakespeare), "--shakespeare-tokens", "128",
            "--calib-sequences", "1", "--device", "cpu", "--quiet", "--out", str(out),
            "--work", str(tmp_path / "work"), *extra]
    t0 = time.monotonic()
    # one thread: on a shared machine a spinning thread pool costs seconds per step
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(STUDY), *argv], capture_output=True, text=True,
                            timeout=900, env=env)
    wall = time.monotonic() - t0
    assert result.returncode == expect_rc, result.stderr[-4000:]
    if expect_rc:
        return None, wall, result.stderr
    return json.loads(out.read_text()), wall, result.stdout


@pytest.mark.slow
def test_study_runs_on_cpu(tmp_path):
    data, _, stdout = _study(tmp_path, "--configs", "original,paper_dkv8,ours_cache8",
                             "--tokens", "128", "--eval-every", "1", "--lr", "1e-3",
                             "--time-limit", "800")
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == ["original", "paper_dkv8", "ours_cache8"]
    for r in rows.values():
        assert r["status"] == "done"
        assert [p["step"] for p in r["points"]] == [0, 1, 2]
        assert [p["tokens"] for p in r["points"]] == [0, 64, 128]
        assert r["points"][0]["train_loss"] is None
        assert all(p["train_loss"] > 0 for p in r["points"][1:])
        for p in r["points"]:
            assert set(p["ppl"]) == {"pydoc", "shakespeare"}
            assert all(math.isfinite(v) and v > 1 for v in p["ppl"].values())
        assert r["timing"]["steps"] == 2 and r["timing"]["tokens_per_s_median"] > 0
    start = {n: r["points"][0]["ppl"]["pydoc"] for n, r in rows.items()}
    # training-free: the original beats ours, which beats the paper's weight SVD by far
    assert start["original"] < start["ours_cache8"] < start["paper_dkv8"] / 10
    # two steps of fine-tuning already recover part of what the paper's conversion lost
    assert rows["paper_dkv8"]["points"][-1]["ppl"]["pydoc"] < start["paper_dkv8"]
    # the byte budget fills the paper's cache size from below (within a few bytes)
    paper = rows["paper_dkv8"]["cache_bytes_per_token_layer"]
    assert 0.95 * paper <= rows["ours_cache8"]["cache_bytes_per_token_layer"] <= paper < \
        rows["original"]["cache_bytes_per_token_layer"]
    assert rows["paper_dkv8"]["mla_config"]["svd"] == "joint"
    assert data["protocol"]["train"]["steps"] == 2
    assert (tmp_path / "study.png").stat().st_size > 5000
    assert "tokens/s median" in stdout  # the per-run timing line


@pytest.mark.slow
def test_time_limit_stops_cleanly_and_keeps_what_was_measured(tmp_path):
    limit = 90
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(REPEAT * 4)
    data, wall, _ = _study(tmp_path, "--configs", "original,paper_dkv16", "--tokens", "1M",
                           "--seq-len", "16", "--batch-size", "1", "--eval-every", "3",
                           "--data", str(corpus), "--time-limit", str(limit))
    assert wall < limit + 10
    first, second = data["rows"]
    assert first["status"] == "stopped (time limit)"
    assert 0 < first["timing"]["steps"] < 1_000_000 // 16
    # a point before the first step and one where the run stopped
    assert first["points"][0]["step"] == 0
    assert first["points"][-1]["step"] == first["timing"]["steps"]
    assert second["status"] in ("stopped (time limit)", "not run (time limit)")
    # the last save comes before the limit, give or take one evaluation slower than the
    # ones measured before it (on a shared machine)
    assert data["elapsed_s"] < limit + 5


@pytest.mark.slow
def test_append_builds_one_table_from_several_runs(tmp_path):
    common = ("--tokens", "64", "--eval-every", "1", "--time-limit", "600")
    _study(tmp_path, "--configs", "paper_dkv8", *common)
    first = json.loads((tmp_path / "study.json").read_text())
    data, _, _ = _study(tmp_path, "--configs", "original", "--append", *common)
    # in the study's order, the earlier row as it was measured
    assert [r["config"] for r in data["rows"]] == ["original", "paper_dkv8"]
    assert data["rows"][1] == first["rows"][0]
    assert all(r["status"] == "done" for r in data["rows"])
    assert len(data["protocol"]["command"]) == 2 and "--append" in data["protocol"]["command"][1]
    # rerunning a configuration replaces its row
    data, _, _ = _study(tmp_path, "--configs", "paper_dkv8", "--append", *common)
    assert [r["config"] for r in data["rows"]] == ["original", "paper_dkv8"]
    assert len(data["protocol"]["command"]) == 3
    # another protocol is refused, before any training, and the JSON is left as it was
    before = (tmp_path / "study.json").read_text()
    _, _, stderr = _study(tmp_path, "--configs", "ours_cache8", "--append", "--tokens", "128",
                          "--time-limit", "600", expect_rc=1)
    assert "--append" in stderr and "'train'" in stderr
    assert (tmp_path / "study.json").read_text() == before
