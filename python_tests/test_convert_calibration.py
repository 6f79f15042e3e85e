import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mla_ext.convert import Calibration, LayerStats, calibrate
from mla_ext.convert.calibration import token_sequences

VOCAB = 100
EOS = 1


def _tokenizer():
    # Word "w<i>" is token i + 2; an in-memory vocabulary keeps the tests offline.
    vocab = {"<unk>": 0, "<eos>": EOS, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


def _doc(ids):
    return " ".join(f"w{i - 2}" for i in ids)


def _texts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    return [_doc(d) for d in docs], docs


def _model(bias=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=VOCAB, attention_bias=bias, eos_token_id=EOS)
    model = LlamaForCausalLM(config).to(dtype)
    if bias:
        with torch.no_grad():  # HF initializes biases to zero; make them matter
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    return model.eval()


def _direct_stats(model, seqs):
    """Statistics from stored activations, computed without hooks: x = input_layernorm(h_i)."""
    cfg = model.config
    h, h_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    xs = [[] for _ in model.model.layers]
    with torch.no_grad():
        for s in seqs:  # one sequence at a time: batching plays no role here
            out = model(torch.tensor([s]), output_hidden_states=True, use_cache=False)
            for i, layer in enumerate(model.model.layers):
                xs[i].append(layer.input_layernorm(out.hidden_states[i])[0])
    stats = []
    for layer, x in zip(model.model.layers, xs):
        x = torch.cat(x)
        with torch.no_grad():
            q = layer.self_attn.q_proj(x).double().reshape(-1, h, hd)
            k = layer.self_attn.k_proj(x).double().reshape(-1, h_kv, hd)
        half = hd // 2

        def pair_norm(y):
            return (y[..., :half] ** 2 + y[..., half:] ** 2).sqrt().mean(dim=0)

        x = x.double()
        stats.append((pair_norm(q), pair_norm(k), x.T @ x, x.shape[0]))
    return stats


def test_token_sequences_cutting():
    tok = _tokenizer()
    texts, docs = _texts([30, 50, 21])
    flat = docs[0] + [EOS] + docs[1] + [EOS] + docs[2]   # 103 tokens
    assert token_sequences(tok, texts, max_length=40) == [flat[:40], flat[40:80], flat[80:]]
    # A 15-token tail is dropped (103 = 4 * 22 + 15).
    assert token_sequences(tok, texts, max_length=22) == [flat[i:i + 22] for i in (0, 22, 44, 66)]
    assert token_sequences(tok, texts, max_length=20, max_sequences=2) == [flat[:20], flat[20:40]]
    # One str; its 14-token tail is dropped.
    assert token_sequences(tok, texts[0], max_length=16) == [docs[0][:16]]


def test_token_sequences_reads_lazily():
    tok = _tokenizer()
    texts, _ = _texts([40, 40])

    def stream():
        yield texts[0]
        yield texts[1]
        raise AssertionError("read past the token budget")

    assert len(token_sequences(tok, stream(), max_length=16, max_sequences=5)) == 5


@pytest.fixture(scope="module")
def streaming_case():
    model, tok = _model(), _tokenizer()
    texts, _ = _texts([60, 80, 78])
    seqs = token_sequences(tok, texts, max_length=32)
    return model, tok, texts, _direct_stats(model, seqs)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_streaming_stats_match_direct_computation(streaming_case, batch_size):
    # 7 sequences (6 of 32 tokens and a 28-token tail): batch_size 3 does not divide them, and
    # the tail cannot share a batch with full-length sequences.
    model, tok, texts, direct = streaming_case
    assert [len(s) for s in token_sequences(tok, texts, max_length=32)] == [32] * 6 + [28]
    cal = calibrate(model, tok, texts, max_length=32, batch_size=batch_size, progress=False)
    assert isinstance(cal, Calibration)
    assert cal.num_tokens == 6 * 32 + 28
    assert (cal.hidden_size, cal.num_heads, cal.num_kv_heads, cal.head_dim) == (64, 4, 2, 16)
    assert len(cal.layers) == 2
    for got, (q, k, xtx, n) in zip(cal.layers, direct):
        assert isinstance(got, LayerStats)
        assert got.num_tokens == n
        assert got.q_pair_norm.dtype == torch.float64 and got.q_pair_norm.shape == (4, 8)
        assert got.k_pair_norm.dtype == torch.float64 and got.k_pair_norm.shape == (2, 8)
        assert got.xtx.dtype == torch.float64 and got.xtx.shape == (64, 64)
        torch.testing.assert_close(got.q_pair_norm, q, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.k_pair_norm, k, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.xtx, xtx, rtol=1e-5, atol=1e-5 * float(xtx.abs().max()))


def test_bias_is_included():
    model, tok = _model(bias=True), _tokenizer()
    texts, _ = _texts([100])
    seqs = token_sequences(tok, texts, max_length=50)
    cal = calibrate(model, tok, texts, max_length=50, collect_xtx=False, progress=False)
    for got, (q, k, _, _) in zip(cal.layers, _direct_stats(model, seqs)):
        assert got.xtx is None
        torch.testing.assert_close(got.q_pair_norm, q, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.k_pair_norm, k, rtol=1e-5, atol=0)


def test_bfloat16_model():
    tok = _tokenizer()
    texts, _ = _texts([100])
    ref = calibrate(_model(), tok, texts, max_length=50, progress=False)
    low = calibrate(_model(dtype=torch.bfloat16), tok, texts, max_length=50, progress=True)
    for a, b in zip(low.layers, ref.layers):
        assert a.q_pair_norm.dtype == torch.float64 and a.xtx.dtype == torch.float64
        torch.testing.assert_close(a.q_pair_norm, b.q_pair_norm, rtol=0.05, atol=0)
        torch.testing.assert_close(a.k_pair_norm, b.k_pair_norm, rtol=0.05, atol=0)


def test_model_state_and_hooks_are_restored_even_on_error():
    model, tok = _model(), _tokenizer()
    texts, _ = _texts([100])
    model.train()
    calibrate(model, tok, texts, max_length=50, progress=False)
    assert model.training

    def boom(module, args):
        raise RuntimeError("forward failed")

    failing = model.model.layers[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        calibrate(model, tok, texts, max_length=50, progress=False)
    failing.remove()
    for layer in model.model.layers:
        assert not layer.self_attn.q_proj._forward_hooks
        assert not layer.self_attn.k_proj._forward_hooks
    assert model.training


def test_check_matches():
    model, tok = _model(), _tokenizer()
    texts, _ = _texts([40])
    cal = calibrate(model, tok, texts, max_length=40, progress=False)
    cal.check_matches(model.config)
    cal.check_matches(model)
    other = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                        vocab_size=VOCAB)
    with pytest.raises(ValueError, match="num_kv_heads: calibration 2, model 4"):
        cal.check_matches(other)
    deeper = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=VOCAB)
    with pytest.raises(ValueError, match="num_layers"):
        cal.check_matches(deeper)


def test_bad_input():
    model, tok = _model(), _tokenizer()
    with pytest.raises(ValueError, match="at least 16"):
        calibrate(model, tok, "", progress=False)
    with pytest.raises(ValueError, match="at least 16"):
        calibrate(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="give 15 tokens"):
        calibrate(model, tok, _texts([15])[0], progress=False)
    with pytest.raises(ValueError, match="texts must contain str"):
        calibrate(model, tok, ["w1 w2", 3], progress=False)
    with pytest.raises(ValueError, match="texts must be a str or an iterable"):
        calibrate(model, tok, 5, progress=False)
    with pytest.raises(ValueError, match="max_length must be >= 16"):
        calibrate(model, tok, _texts([40])[0], max_length=8, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        calibrate(model, tok, _texts([40])[0], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_sequences"):
        calibrate(model, tok, _texts([40])[0], max_sequences=0, progress=False)
    converted = _model()
    del converted.model.layers[1].self_attn.q_proj
    with pytest.raises(ValueError, match="layer 1 has no self_attn.q_proj.*already converted"):
        calibrate(converted, tok, _texts([40])[0], progress=False)
    with pytest.raises(ValueError, match="model has no .config"):
        calibrate(torch.nn.Linear(2, 2), tok, _texts([40])[0], progress=False)
    not_llama = torch.nn.Linear(2, 2)
    not_llama.config = model.config
    with pytest.raises(ValueError, match="no decoder layers"):
        calibrate(not_llama, tok, _texts([40])[0], progress=False)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    model, tok = _model(), _tokenizer()
    texts, _ = _texts([60, 80, 78])
    cpu = calibrate(model, tok, texts, max_length=32, batch_size=3, progress=False)
    gpu = calibrate(model.cuda(), tok, texts, max_length=32, batch_size=3, progress=False)
    for a, b in zip(gpu.layers, cpu.layers):
        assert a.q_pair_norm.device.type == "cpu"
        torch.testing.assert_close(a.q_pair_norm, b.q_pair_norm, rtol=1e-4, atol=0)
        torch.testing.assert_close(a.k_pair_norm, b.k_pair_norm, rtol=1e-4, atol=0)
        torch.testing.assert_close(a.xtx, b.xtx, rtol=1e-4, atol=1e-4 * float(b.xtx.abs().max()))
