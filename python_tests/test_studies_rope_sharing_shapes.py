"""studies/rope_sharing_shapes.py end to end on test-size shapes: the JSON's structure, and the
free search (auto) never worse than per-head keys alone, whose candidates it includes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("per-head", "shared", "auto")


def test_tiny_study_compares_per_head_shared_and_auto(tmp_path):
    out = tmp_path / "shapes.json"
    result = subprocess.run([sys.executable, str(ROOT / "studies" / "rope_sharing_shapes.py"),
                             "--tiny", "--models", "llama2-7b", "llama3-8b", "--layers", "2",
                             "--calib-sequences", "2", "--calib-length", "128",
                             "--rope-pair-step", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "llama3-8b 48 B/layer" in result.stdout   # progress names model and budget
    data = json.loads(out.read_text())
    assert data["protocol"]["tiny"] and data["protocol"]["rope_pair_step"] == 1
    assert [row["model"] for row in data["rows"]] == ["llama2-7b", "llama3-8b"]
    assert [row["kv_heads"] for row in data["rows"]] == [4, 2]
    for row in data["rows"]:
        assert row["layers"] == 2 and set(row["budgets"]) == {"0.1875", "0.125"}
        original = 2 * row["kv_heads"] * row["head_dim"] * 2
        for ratio, budget in row["budgets"].items():
            assert budget["bytes_per_layer"] == float(ratio) * original
            for mode in MODES:
                for kind in ("layer_budget", "chosen"):
                    picks = budget[mode][kind]
                    assert len(picks) == 2
                    for pick in picks:
                        assert pick["error"] >= 0 and pick["latent_dim"] > 0
                        assert mode == "auto" or pick["sharing"] == mode
                for pick in budget[mode]["layer_budget"]:
                    assert pick["cost"] <= budget["bytes_per_layer"]
                chosen = budget[mode]["chosen"]
                assert sum(p["cost"] for p in chosen) <= budget["budget"]
                assert budget[mode]["chosen_error"] == sum(p["error"] for p in chosen)
            # auto searches per-head and shared keys together: never worse than either alone
            for kind in ("per-head", "shared"):
                assert budget["auto"]["chosen_error"] <= budget[kind]["chosen_error"]
                for auto, alone in zip(budget["auto"]["layer_budget"],
                                       budget[kind]["layer_budget"]):
                    assert auto["error"] <= alone["error"]
            ratios = budget["auto_over_per_head"]
            assert 0 < ratios["layer_budget_mean"] <= 1 and 0 < ratios["chosen_total"] <= 1


def test_bad_arguments_are_named():
    result = subprocess.run([sys.executable, str(ROOT / "studies" / "rope_sharing_shapes.py"),
                             "--layers", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--layers" in result.stderr
