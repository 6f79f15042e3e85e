import copy
import json
import shutil

import pytest
import torch

import mla_ext
from mla_ext.cli import main
from mla_ext.modeling import CheckpointError
from mla_ext.train import TrainConfig, finetune, list_checkpoints, read_log
from test_train_data import REPEAT, char_tokenizer
from tiny import converted, tiny_model

MLA = dict(rope_strategy="high", rope_pairs=2, d_kv=4)
SMALL = dict(seq_len=16, batch_size=2, lr=3e-3, warmup=0.2, decay=0.3, progress=False,
             plot=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(REPEAT)
    return path


def mla_model():
    return converted(tiny_model(), **MLA)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_decreases_and_final_model_loads(tmp_path, text):
    model = mla_model()
    history = finetune(model, char_tokenizer(), text,
                       TrainConfig(steps=40, **{**SMALL, "batch_size": 4, "plot": True}),
                       tmp_path / "run")
    losses = [r["loss"] for r in history]
    assert [r["step"] for r in history] == list(range(1, 41))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert read_log(tmp_path / "run") == history
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in history)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    loaded, tok = mla_ext.load_pretrained(tmp_path / "run" / "final", return_tokenizer=True)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert tok is not None and not model.training


def test_exact_resume(tmp_path, text):
    cfg = dict(steps=6, grad_accum=2, **SMALL)
    straight_model = mla_model()
    straight = finetune(straight_model, char_tokenizer(), text, TrainConfig(**cfg),
                        tmp_path / "a")
    first = finetune(mla_model(), char_tokenizer(), text, TrainConfig(stop_after=3, **cfg),
                     tmp_path / "b")
    assert len(first) == 3 and not (tmp_path / "b" / "final").exists()
    fresh = tiny_model(seed=7)   # whatever the weights, the checkpoint replaces them
    resumed_model = converted(fresh, **MLA)
    resumed = finetune(resumed_model, char_tokenizer(), text,
                       TrainConfig(resume="latest", **cfg), tmp_path / "b")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    for k, v in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[k], v), k


def test_crash_between_checkpoints_loses_only_the_steps_after_the_last_one(tmp_path, text):
    cfg = dict(steps=6, save_every=2, keep=0, **SMALL)
    straight = finetune(mla_model(), char_tokenizer(), text, TrainConfig(**cfg), tmp_path / "a")
    finetune(mla_model(), char_tokenizer(), text, TrainConfig(stop_after=5, **cfg),
             tmp_path / "b")
    # what a crash while writing step 5's checkpoint leaves: the unrenamed temporary directory
    ckpts = tmp_path / "b" / "checkpoints"
    (ckpts / "step_00000005").rename(ckpts / ".step_00000005.tmp")
    with open(tmp_path / "b" / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 0.1')             # a line cut short by the crash
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_00000002",
                                                                 "step_00000004"]
    resumed = finetune(mla_model(), char_tokenizer(), text,
                       TrainConfig(resume="latest", **cfg), tmp_path / "b")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["step"] for r in read_log(tmp_path / "b")] == list(range(1, 7))
    assert not (ckpts / ".step_00000005.tmp").exists()


def test_train_only_attention_and_checkpointing(tmp_path, text):
    model = mla_model()
    before = weights(model)
    history = finetune(model, char_tokenizer(), text,
                       TrainConfig(steps=3, train_only="attention", gradient_checkpointing=True,
                                   **SMALL), tmp_path / "run")
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        trainable = ".self_attn." in name or "norm" in name
        if name.endswith("rope_pairs"):
            assert not changed
        else:
            assert changed == trainable, name
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags come back
    # activation checkpointing recomputes the same numbers
    plain = finetune(mla_model(), char_tokenizer(), text,
                     TrainConfig(steps=3, train_only="attention", **SMALL), tmp_path / "plain")
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in history], rel=1e-5)


def test_unconverted_baseline_is_saved_in_hugging_face_format(tmp_path, text):
    from mla_ext.models import load_model

    model = tiny_model()
    finetune(model, char_tokenizer(), text, TrainConfig(steps=2, **SMALL), tmp_path / "run")
    loaded, tok = load_model(str(tmp_path / "run" / "final"))
    x = torch.randint(0, 98, (1, 12))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert tok("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]


def test_bad_inputs_fail_before_any_work(tmp_path, text):
    tok = char_tokenizer()
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="seq_len 512 exceeds the model's "
                                         "max_position_embeddings \\(256\\)"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, **{**SMALL, "seq_len": 512}), out)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune(mla_model(), tok, text, TrainConfig(steps=0, **SMALL), out)
    with pytest.raises(ValueError, match="distributed='ddp' needs a torchrun launch"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, distributed="ddp", **SMALL), out)
    with pytest.raises(ValueError, match="does not exist"):
        finetune(mla_model(), tok, tmp_path / "nope.txt", TrainConfig(steps=2, **SMALL), out)
    with pytest.raises(ValueError, match="tokenizer is None"):
        finetune(mla_model(), None, text, TrainConfig(steps=2, **SMALL), out)
    with pytest.raises(ValueError, match="stop_after must be in 1..steps"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, stop_after=3, **SMALL), out)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, resume="latest", **SMALL), out)
    assert not out.exists()

    finetune(mla_model(), tok, text, TrainConfig(steps=2, **SMALL), out)
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, **SMALL), out)
    packed = out / "data"
    with pytest.raises(ValueError, match="has seq_len 16, the run asks for 8"):
        finetune(mla_model(), tok, packed, TrainConfig(steps=2, **{**SMALL, "seq_len": 8}),
                 tmp_path / "other")

    other = converted(tiny_model(hidden=96, heads=6, kv_heads=2), **MLA)
    with pytest.raises(CheckpointError, match="belongs to another model: hidden_size"):
        finetune(other, tok, text, TrainConfig(steps=2, resume="latest", **SMALL), out)
    with pytest.raises(CheckpointError, match="other settings.*lr"):
        finetune(mla_model(), tok, text,
                 TrainConfig(steps=2, resume="latest", **{**SMALL, "lr": 1e-3}), out)
    with pytest.raises(CheckpointError, match="at step 2: nothing left"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, resume="latest", **SMALL), out)

    ckpt = list_checkpoints(out)[-1]
    blob = bytearray((ckpt / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (ckpt / "model.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.pt is corrupt"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, resume="latest", **SMALL), out)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, resume="latest", **SMALL), out)
    with pytest.raises(CheckpointError, match="incomplete or not a training checkpoint"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, resume=str(ckpt), **SMALL), out)


def _kl_to(teacher, model, x) -> float:
    with torch.no_grad():
        t = teacher(input_ids=x).logits.log_softmax(-1)
        m = model(input_ids=x).logits.log_softmax(-1)
    return torch.nn.functional.kl_div(m, t, log_target=True, reduction="none").sum(-1).mean().item()


def test_distillation_from_the_original_model(tmp_path, text):
    tok = char_tokenizer()
    # a copy of the model as its own teacher: the distillation term starts at exactly zero
    model = mla_model()
    history = finetune(model, tok, text, TrainConfig(steps=1, distill=1.0, **SMALL),
                       tmp_path / "self", teacher=copy.deepcopy(model))
    assert history[0]["loss"] < 1e-5
    # the converted model distilled from its original moves toward it
    original = tiny_model()
    student = converted(original, **MLA)
    x = torch.tensor([tok.encode(REPEAT[:64])])
    before = _kl_to(original, student, x)
    history = finetune(student, tok, text, TrainConfig(steps=30, distill=1.0, **SMALL),
                       tmp_path / "kd", teacher=original)
    assert _kl_to(original, student.eval(), x) < 0.5 * before
    assert all(p.grad is None for p in original.parameters())
    # half and half: the logged loss mixes both terms, still finite and falling
    mixed = finetune(converted(original, **MLA), tok, text,
                     TrainConfig(steps=20, distill=0.5, **SMALL), tmp_path / "mix",
                     teacher=original)
    assert mixed[-1]["loss"] < mixed[0]["loss"]


def test_distillation_rejects_bad_settings(tmp_path, text):
    tok, out = char_tokenizer(), tmp_path / "run"
    with pytest.raises(ValueError, match="distill must be a number in \\[0, 1\\]"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, distill=1.5, **SMALL), out)
    with pytest.raises(ValueError, match="needs a teacher"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, distill=0.5, **SMALL), out)
    with pytest.raises(ValueError, match="distill is 0"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, **SMALL), out,
                 teacher=tiny_model())
    with pytest.raises(ValueError, match="vocab_size"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, distill=1.0, **SMALL), out,
                 teacher=tiny_model(vocab_size=64))
    assert not out.exists()
    finetune(mla_model(), tok, text, TrainConfig(steps=2, save_every=1, **SMALL), out)
    with pytest.raises(CheckpointError, match="other settings.*distill"):
        finetune(mla_model(), tok, text, TrainConfig(steps=2, resume="latest", distill=1.0,
                                                     **SMALL), out, teacher=tiny_model())


def test_cli_help(capsys):
    for command in ("finetune", "pack"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--seq-len", "--grad-accum", "--resume", "--distributed", "--train-only",
                 "--save-every", "--max-tokens", "--shard-tokens"):
        assert flag in help_text


def test_cli_pack_and_finetune_a_checkpoint(tmp_path, text, capsys):
    tok = char_tokenizer()
    mla_ext.save_pretrained(mla_model(), tmp_path / "ckpt", tokenizer=tok)
    assert main(["pack", "--tokenizer", str(tmp_path / "ckpt"), "--data", str(text),
                 "--seq-len", "16", "--out", str(tmp_path / "packed"), "--no-progress"]) == 0
    assert "packed" in capsys.readouterr().out
    args = ["finetune", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "packed"),
            "--out", str(tmp_path / "run"), "--steps", "4", "--seq-len", "16", "--batch-size",
            "2", "--lr", "3e-3", "--save-every", "2", "--no-progress", "--no-plot"]
    assert main(args + ["--stop-after", "2"]) == 0
    assert main(args + ["--resume"]) == 0
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2, 3, 4]
    mla_ext.load_pretrained(tmp_path / "run" / "final")

    assert main(args[:-4] + ["--seq-len", "4096", "--out", str(tmp_path / "x")]) == 2
    assert "--seq-len 4096 exceeds max_position_embeddings 256" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xc3\x28 not utf-8")
    assert main(["finetune", "--model", str(tmp_path / "ckpt"), "--data", str(bad),
                 "--out", str(tmp_path / "y"), "--seq-len", "16"]) == 2
    assert "bad.txt is not UTF-8 text" in capsys.readouterr().err
    assert main(args[:-4] + ["--out", str(tmp_path / "z"), "--distill", "0.5"]) == 2
    assert "--distill W (> 0) and --teacher MODEL go together" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z"))
    # distilled from the checkpoint itself (a teacher directory, as --model)
    assert main(args[:-4] + ["--out", str(tmp_path / "kd"), "--steps", "2", "--distill", "1",
                             "--teacher", str(tmp_path / "ckpt")]) == 0
    assert read_log(tmp_path / "kd")[0]["loss"] < 1e-5
