"""studies/finetune_fsdp.py on CPU: a tiny shape under torchrun with 1 and 2 gloo processes (the
same global batch, so the same loss curve), checkpoint, restart and exact resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "finetune_fsdp.py"
sys.path.insert(0, str(ROOT))

from studies import finetune_fsdp  # noqa: E402

TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--intermediate", "128", "--d-kv", "4", "--rope-pairs", "2", "--seq-len", "32",
        "--steps", "6", "--checkpoint-step", "4", "--lr", "3e-3", "--warmup-steps", "1",
        "--quiet"]


def test_needs_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit):
        finetune_fsdp.parse_args([])
    assert "torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "10", "--checkpoint-step", "4"], "--checkpoint-step"),
    (["--steps", "10", "--checkpoint-step", "10"], "--checkpoint-step"),
    (["--steps", "2"], "--steps"),
    (["--hidden", "100", "--heads", "32"], "--head-dim"),
    (["--heads", "32", "--kv-heads", "5"], "--kv-heads"),
    (["--rope-pairs", "80"], "--rope-pairs"),
    (["--layers", "0"], "--layers"),
])
def test_bad_arguments_are_named(argv, fragment, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exc:
        finetune_fsdp.parse_args(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_parameter_count_matches_the_built_model(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = finetune_fsdp.parse_args(TINY)
    model = finetune_fsdp.build_model(args, vocab_size=300, seed=0, device="cpu")
    counts = finetune_fsdp.parameter_counts(args, 300)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    attn = model.model.layers[1].self_attn
    assert attn.latent_dim == 8 and attn.rope_pairs.tolist() == [[0, 4], [0, 4]]
    # random, not the zeros an unloaded checkpoint structure would hold
    assert 0.015 < attn.kv_down.weight.std() < 0.025
    # same seed, same weights (every rank builds its own copy before sharding)
    again = finetune_fsdp.build_model(args, vocab_size=300, seed=0, device="cpu")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def _launch(tmp_path, procs: int, batch: int):
    out = tmp_path / f"fsdp_{procs}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(procs), str(SCRIPT), *TINY, "--batch-size", str(batch), "--device", "cpu",
         "--out", str(out), "--work", str(tmp_path / f"work{procs}")],
        env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "PASSED" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp_checkpoint_restart_resumes_exactly_on_one_and_two_processes(tmp_path):
    two = _launch(tmp_path, 2, batch=1)
    one = _launch(tmp_path, 1, batch=2)
    for result, procs in ((two, 2), (one, 1)):
        assert result["what_ran"]["processes"] == procs
        assert result["what_ran"]["global_batch_tokens"] == 2 * 32
        assert [r["step"] for r in result["rows"]] == list(range(1, 7))
        resumed = [r for r in result["rows"] if "loss_resumed" in r]
        assert [r["step"] for r in resumed] == [5, 6]
        check = result["resume_check"]
        assert check["passed"] and check["first_resumed_step_equal"]
        assert check["max_rel_diff"] < 1e-6
        assert result["loss"]["decreased"]
        assert len(result["memory_per_rank"]) == procs
        assert all(r["uninterrupted"]["host_rss_peak_gb"] > 0 for r in result["memory_per_rank"])
        assert result["throughput"]["tokens_per_s"] > 0
        params = result["what_ran"]["parameters"]["total"]
        # fp32 weights + two AdamW moments, plus the small state and RNG files
        assert 12 * params < result["checkpoint"]["bytes"] < 12 * params * 1.05 + 2e6
        assert result["what_ran"]["shape"]["layers"] == 2
        assert not result["what_ran"]["shape"]["full_llama2_7b_shape"]
    # the same global batch on 1 and 2 processes: the same loss curve
    torch.testing.assert_close([r["loss"] for r in two["rows"]],
                               [r["loss"] for r in one["rows"]], rtol=1e-5, atol=0)
    assert two["tag"] == "2xcpu" and one["tag"] == "1xcpu"
