"""mla_ext.generate and its decode step: padded batches on the absorbed path, the static caches'
bookkeeping, a step that compiles as one graph (the CPU stand-in for CUDA-graph capture), seeded
sampling, EOS handling and bad input. The GPU tests replay the captured step."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import mla_ext
from mla_ext import ops
from mla_ext.generation import DecodeStep, make_cache, prefill, sample_tokens
from mla_ext.modeling.kv_cache import StaticKVCache
from tiny import VOCAB, converted, tiny_model

LOSSY = dict(rope_strategy="high", rope_pairs=2, d_kv=8)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = tiny_model()
    return model, converted(model, **LOSSY)


def _padded(lengths, pad=0, side="left"):
    """Random prompts of the given lengths as one padded batch, and each prompt alone."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    alone = []
    for i, n in enumerate(lengths):
        prompt = torch.randint(1, VOCAB, (n,))
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols], mask[i, cols] = prompt, 1
        alone.append(prompt.view(1, -1))
    return ids, mask, alone


def _kwargs(model):
    return {"cache_dtype": "fp32"} if mla_ext.generation.is_converted(model) else {}


@pytest.mark.parametrize("side", ["original", "converted"])
def test_padded_batch_equals_each_prompt_alone(models, side):
    model = models[side == "converted"]
    ids, mask, alone = _padded([5, 11, 1, 8])
    out = mla_ext.generate(model, ids, mask, 12, prefill_chunk=4, **_kwargs(model))
    assert out.shape == (4, 11 + 12) and torch.equal(out[:, :11], ids)
    for i, prompt in enumerate(alone):
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:]
        assert torch.equal(out[i, 11:], expected), f"prompt {i}"


@pytest.mark.parametrize("mode", ["auto", "reconstruct"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_generate_with_padding_stores_only_real_tokens(models, mode, attn):
    mla = converted(tiny_model(), **LOSSY)
    mla.config._attn_implementation = attn
    for layer in mla.model.layers:
        layer.self_attn.decode_mode = mode
    ids, mask, alone = _padded([4, 9, 6], side="left")
    cache = mla_ext.LatentCache(mla, cache_dtype="fp32", block_size=4)
    out = mla.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8,
                       do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    assert cache.seq_lens.tolist() == [4 + 7, 9 + 7, 6 + 7]     # the last token is not cached
    for i, prompt in enumerate(alone):
        expected = mla.generate(prompt, past_key_values=mla_ext.LatentCache(mla, "fp32"),
                                max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
        assert torch.equal(out[i], expected), f"{mode}/{attn}: prompt {i}"


def test_absorbed_decode_makes_no_range_check_unless_asked(models, monkeypatch):
    mla = models[1]
    checks = []
    real = ops._check_block_table
    monkeypatch.setattr(ops, "_check_slots", lambda *a: checks.append("slots"))
    monkeypatch.setattr(ops, "_check_block_table", lambda *a: checks.append("table") or real(*a))
    cache = mla_ext.LatentCache(mla, cache_dtype="fp32")
    mla(torch.randint(1, VOCAB, (2, 6)), past_key_values=cache)
    checks.clear()
    mla(torch.randint(1, VOCAB, (2, 1)), past_key_values=cache)
    assert checks == []
    with ops.debug_checks():
        mla(torch.randint(1, VOCAB, (2, 1)), past_key_values=cache)
    assert "slots" in checks


def _step_for(model, prompts, capacity=40):
    cache = make_cache(model, len(prompts), capacity, **_kwargs(model))
    first = sample_tokens(prefill(model, cache, prompts), 0.0, 1.0)
    output = torch.zeros(len(prompts), 16, dtype=torch.long)
    output[:, 0] = first
    return DecodeStep(model, cache, first.clone(), output, None, 0, 0.0, 1.0), cache


@pytest.mark.parametrize("side", ["original", "converted"])
def test_decode_step_compiles_to_one_graph_without_recompiling(models, side):
    model = models[side == "converted"]
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (5, 9, 2)]
    with torch.no_grad():
        eager, eager_cache = _step_for(model, prompts)
        for _ in range(6):
            eager()
        step, cache = _step_for(model, prompts)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(step.__call__, backend=counter, fullgraph=True)
        for _ in range(6):
            compiled()
            cache.advance(1)   # the driver's host bookkeeping, outside the compiled step
    assert counter.frame_count == 1, "the decode step recompiled"
    assert torch.equal(step.output, eager.output)
    assert cache.seq_lens.tolist() == eager_cache.seq_lens.tolist() == [11, 15, 8]
    assert cache.table.lengths == [11, 15, 8]


def test_static_latent_cache_bookkeeping(models):
    mla = models[1]
    cache = mla_ext.LatentCache(mla, cache_dtype="int8", block_size=4, max_length=10,
                                batch_size=3)
    blocks = cache.layers[0].storage["latent"].shape[0]
    assert blocks == 3 * 3 and cache.nbytes() > 0
    assert cache.table.block_table.unique().numel() == 9
    row = cache.row(1)
    mla(torch.randint(1, VOCAB, (1, 7)), past_key_values=row)
    assert cache.seq_lens.tolist() == [0, 7, 0] and cache.table.lengths == [0, 7, 0]
    assert row.layers[0].storage["latent"] is cache.layers[0].storage["latent"]
    mla(torch.randint(1, VOCAB, (1, 3)), past_key_values=row)
    assert cache.seq_lens.tolist() == [0, 10, 0]
    before = [t.clone() for t in cache.layers[0].tensors() if t is not None]
    with pytest.raises(ValueError, match="max_length=10"):
        mla(torch.randint(1, VOCAB, (1, 1)), past_key_values=row)
    after = [t for t in cache.layers[0].tensors() if t is not None]
    # bytes, not values: never-written storage may hold NaNs
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(before, after)), "written past the capacity"
    assert cache.seq_lens.tolist() == [0, 10, 0]
    with pytest.raises(ValueError, match="batch of 2"):
        mla(torch.randint(1, VOCAB, (2, 1)), past_key_values=cache)
    with pytest.raises(IndexError, match="row 3"):
        cache.row(3)
    with pytest.raises(ValueError, match="max_length"):
        mla_ext.LatentCache(mla, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        mla_ext.LatentCache(mla, max_length=8, batch_size=0)
    with pytest.raises(ValueError, match="rows exist"):
        mla_ext.LatentCache(mla).row(0)


def test_static_kv_cache_rows_and_mask(models):
    model = models[0]
    cache = StaticKVCache(model, 2, 12)
    model(torch.randint(1, VOCAB, (1, 5)), past_key_values=cache.row(1), use_cache=True)
    assert cache.seq_lens.tolist() == [0, 5] and cache.get_seq_length() == 5
    mask = cache.decode_mask(torch.float32, boolean=True)
    assert mask.shape == (2, 1, 1, 12)
    assert mask[0, 0, 0].tolist() == [True] + [False] * 11
    assert mask[1, 0, 0].tolist() == [True] * 6 + [False] * 6
    additive = cache.decode_mask(torch.float32, boolean=False)
    assert (additive[mask] == 0).all() and (additive[~mask] < -1e30).all()


def test_sampling_is_reproducible_under_a_seed(models):
    mla = models[1]
    ids = torch.randint(1, VOCAB, (3, 6))
    runs = [mla_ext.generate(mla, ids, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=s,
                             cache_dtype="fp32") for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # a nucleus of one token is greedy decoding
    greedy = mla_ext.generate(mla, ids, max_new_tokens=10, cache_dtype="fp32")
    tiny_nucleus = mla_ext.generate(mla, ids, max_new_tokens=10, temperature=1.0, top_p=1e-6,
                                    seed=1, cache_dtype="fp32")
    assert torch.equal(greedy, tiny_nucleus)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    drawn = sample_tokens(logits, 1.0, 0.75)
    counts = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    assert counts[2:].sum() == 0          # 0.5 + 0.3 reach 0.75: the others never come
    assert abs(counts[0] - 0.5 / 0.8) < 0.05


def test_eos_finishes_one_sequence_without_stalling_the_others(models):
    mla = models[1]
    ids = torch.randint(1, VOCAB, (2, 7))
    free = mla_ext.generate(mla, ids, max_new_tokens=12, cache_dtype="fp32")[:, 7:]
    eos = int(free[0, 3])
    assert eos not in free[1].tolist() or pytest.skip("both sequences make the EOS token")
    out, stats = mla_ext.generate(mla, ids, max_new_tokens=12, cache_dtype="fp32",
                                  eos_token_id=[eos], pad_token_id=-1, return_stats=True)
    new = out[:, 7:]
    stop = free[0].tolist().index(eos)
    assert torch.equal(new[0, :stop + 1], free[0, :stop + 1])
    assert (new[0, stop + 1:] == -1).all()
    assert torch.equal(new[1], free[1])
    assert stats.decode_steps == 11 and stats.tokens_per_s > 0


def test_all_finished_ends_the_loop_early(models):
    mla = models[1]
    ids = torch.randint(1, VOCAB, (1, 5))
    free = mla_ext.generate(mla, ids, max_new_tokens=4, cache_dtype="fp32")[0, 5:]
    out = mla_ext.generate(mla, ids, max_new_tokens=200, cache_dtype="fp32",
                           eos_token_id=int(free[1]))
    assert out.shape[1] - 5 < 200 and int(out[0, 6]) == int(free[1])


def test_bad_input_is_named(models):
    model, mla = models
    ids = torch.randint(1, VOCAB, (2, 4))
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(prefill_chunk=0), "prefill_chunk"),
        (dict(attention_mask=torch.ones(2, 3)), "attention_mask"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), "prompt 1"),
        (dict(cuda_graph=True), "cuda_graph=True: the model is on cpu"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            mla_ext.generate(mla, ids, **{"max_new_tokens": 3, **kwargs})
    with pytest.raises(ValueError, match="input_ids"):
        mla_ext.generate(mla, ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        mla_ext.generate(mla, ids[:, :0])
    with pytest.raises(ValueError, match="cache_dtype"):
        mla_ext.generate(model, ids, max_new_tokens=2, cache_dtype="int4")
    with pytest.raises(ValueError, match="cache_dtype"):
        mla_ext.generate(mla, ids, max_new_tokens=2, cache_dtype="int3")


# ---------------------------------------------------------------- GPU: the captured step

CUDA_FORMATS = [("bf16", None), ("int8", None), ("int4", None), ("fp8", None),
                ("int4", "fp8"), ("bf16", "fp8")]


@pytest.mark.parametrize("q, latent, rope, d_r, why", [
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 16, None),
    (torch.float16, torch.uint8, torch.float8_e4m3fn, 8, None),
    (torch.bfloat16, torch.int8, torch.float8_e4m3fn, 2, "multiple of 4 for fp8 keys"),
    (torch.float32, torch.float32, torch.float32, 16, "queries in torch.float32"),
    (torch.bfloat16, torch.float16, torch.bfloat16, 16, "latent under torch.bfloat16 queries"),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 66, "even d_r up to 64"),
])
def test_which_cache_formats_the_decode_kernel_declines(q, latent, rope, d_r, why):
    reason = ops.decode_kernel_declines(q, latent, rope, d_r)
    assert (reason is None) if why is None else (why in reason)


@pytest.fixture(scope="module")
def cuda_models():
    torch.manual_seed(0)
    model = tiny_model()
    mla = converted(model, **LOSSY)   # converted on the CPU in float64, as users do
    return model.to("cuda", torch.bfloat16), mla.to("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype, rope_dtype", CUDA_FORMATS)
def test_graph_replay_equals_the_eager_step(cuda_models, cache_dtype, rope_dtype):
    mla = cuda_models[1]
    ids, mask, _ = _padded([37, 90, 5, 64])
    kwargs = dict(cache_dtype=cache_dtype, rope_dtype=rope_dtype, max_new_tokens=120)
    graph = mla_ext.generate(mla, ids.cuda(), mask.cuda(), cuda_graph=True, **kwargs)
    eager = mla_ext.generate(mla, ids.cuda(), mask.cuda(), cuda_graph=False, **kwargs)
    assert graph.shape[1] == 90 + 120
    assert torch.equal(graph, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["original", "converted"])
def test_decode_step_makes_no_host_sync(cuda_models, side):
    model = cuda_models[side == "converted"]
    prompts = [torch.randint(1, VOCAB, (n,), device="cuda") for n in (70, 3)]
    cache = make_cache(model, 2, 200, "int4" if side == "converted" else None)
    with torch.no_grad():
        first = sample_tokens(prefill(model, cache, prompts), 0.0, 1.0)
        output = torch.zeros(2, 16, dtype=torch.long, device="cuda")
        step = DecodeStep(model, cache, first.clone(), output, None, 0, 0.0, 1.0)
        step()      # lazy initialisation (kernel occupancy, cuBLAS handles) happens once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.seq_lens.tolist() == [75, 8]


@pytest.mark.gpu
@pytest.mark.parametrize("side", ["original", "converted"])
def test_padded_graph_batch_equals_unbatched_runs(cuda_models, side):
    # bf16: a batch of 3 and a batch of 1 run GEMMs (and split plans) of other shapes, whose
    # rounding may flip a near-tie late in a random model's greedy chain: the first 12 tokens
    # must agree, and they exercise padding (prompts of 20, 3 and 66 tokens) from the first step
    model = cuda_models[side == "converted"]
    ids, mask, alone = _padded([20, 3, 66])
    out = mla_ext.generate(model, ids.cuda(), mask.cuda(), 40, cuda_graph=True)
    for i, prompt in enumerate(alone):
        single = mla_ext.generate(model, prompt.cuda(), max_new_tokens=40, cuda_graph=True)
        assert torch.equal(out[i, 66:78], single[0, prompt.shape[1]:prompt.shape[1] + 12]), i


@pytest.mark.gpu
def test_original_harness_equals_hugging_face_greedy():
    torch.manual_seed(1)
    model = tiny_model().to("cuda")           # fp32: no near-tie of rounding between the paths
    ids = torch.randint(1, VOCAB, (3, 17), device="cuda")
    ours = mla_ext.generate(model, ids, max_new_tokens=48, cuda_graph=True)
    theirs = model.generate(ids, max_new_tokens=48, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.gpu
def test_a_cache_the_kernel_declines_decodes_eagerly():
    """fp8 RoPE keys of d_r = 2 take the reference (which reads lengths on the host): no graph."""
    mla = converted(tiny_model(), rope_strategy="high", rope_pairs=1, d_kv=8).to(
        "cuda", torch.bfloat16)
    ids, mask, _ = _padded([12, 7])
    kwargs = dict(cache_dtype="int4", rope_dtype="fp8", max_new_tokens=8)
    with pytest.raises(ValueError, match="layer 0's cache.*d_r = 2"):
        mla_ext.generate(mla, ids.cuda(), mask.cuda(), cuda_graph=True, **kwargs)
    auto, stats = mla_ext.generate(mla, ids.cuda(), mask.cuda(), return_stats=True, **kwargs)
    assert not stats.cuda_graph
    assert torch.equal(auto, mla_ext.generate(mla, ids.cuda(), mask.cuda(), cuda_graph=False,
                                              **kwargs))
