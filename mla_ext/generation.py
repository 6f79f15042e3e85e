"""generate(): prefill, then one decode step per token, replayed from a CUDA graph on a GPU.

The same harness serves a converted model (over a static ``LatentCache``) and an unconverted one
(over a ``StaticKVCache``), so that both sides of a comparison run the same code:

1. Each prompt is prefilled alone into its row of the static cache, in chunks of
   ``prefill_chunk`` tokens (a chunk attends to the cache written so far plus itself), so that
   padding is never stored and peak memory is the cache plus one chunk's activations.
2. A decode step (``DecodeStep``) feeds every sequence's last token at its own position, samples
   on the device and writes the token into a preallocated output; it reads no device value on
   the host, so that it captures into a CUDA graph (and compiles with ``fullgraph=True``).
3. Sequences that produced an EOS token keep stepping with ``pad_token_id`` (their output is
   padded) while the others go on; the loop ends when every sequence is finished (checked every
   ``EOS_CHECK_EVERY`` steps) or after ``max_new_tokens``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import ops
from .checks import require_model
from .modeling.attention import MLAAttention
from .modeling.cache import LatentCache
from .modeling.kv_cache import StaticKVCache

EOS_CHECK_EVERY = 16  # decode steps between the host's looks at "all finished" (one sync each)


def is_converted(model) -> bool:
    return any(isinstance(m, MLAAttention) for m in model.modules())


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens on the device, without a host sync: greedy at temperature 0,
    else nucleus sampling by the exponential race (argmax of p / E, E ~ Exp(1))."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        dropped = sorted_probs.cumsum(-1) - sorted_probs > top_p   # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(dropped, 0))
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def forward_step(model, input_ids, positions, attention_mask, cache) -> torch.Tensor:
    """The decoder on (B, t) tokens at (B, t) positions through ``cache``: the last position's
    logits (B, V). The decoder's own pieces, called directly: no mask is built from host
    lengths, so the step depends on device tensors only."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    position_embeddings = inner.rotary_emb(hidden, position_ids=positions)
    for layer in inner.layers[:model.config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=attention_mask, position_ids=positions,
                       position_embeddings=position_embeddings, past_key_values=cache,
                       use_cache=True)
    return model.lm_head(inner.norm(hidden[:, -1:]))[:, -1]


class DecodeStep:
    """One decode step over static buffers: ``tokens`` (B,) in, the next tokens written to
    ``tokens`` and to column ``counter`` of ``output``; ``finished`` marks sequences that made
    an EOS. Everything it touches is preallocated, so it replays from a CUDA graph."""

    def __init__(self, model, cache, tokens, output, eos_ids, pad_token_id, temperature, top_p):
        self.model, self.cache = model, cache
        self.tokens, self.output = tokens, output
        self.counter = torch.ones(1, dtype=torch.long, device=tokens.device)
        self.eos = eos_ids
        self.finished = (torch.isin(tokens, eos_ids) if eos_ids is not None
                         else torch.zeros_like(tokens, dtype=torch.bool))
        self.pad = pad_token_id
        self.temperature, self.top_p = temperature, top_p
        attn = getattr(model.config, "_attn_implementation", "sdpa")
        self.boolean_mask = attn == "sdpa"

    def __call__(self) -> None:
        positions = self.cache.seq_lens.long().view(-1, 1)      # each sequence's next position
        mask = (self.cache.decode_mask(self.model.dtype, self.boolean_mask)
                if isinstance(self.cache, StaticKVCache) else None)
        logits = forward_step(self.model, self.tokens.view(-1, 1), positions, mask, self.cache)
        nxt = sample_tokens(logits, self.temperature, self.top_p)
        # a finished sequence shows padding but keeps feeding real tokens (any pad id is valid)
        shown = torch.where(self.finished, torch.full_like(nxt, self.pad), nxt)
        if self.eos is not None:
            self.finished |= torch.isin(nxt, self.eos)
        self.output.scatter_(1, self.counter.expand(nxt.shape[0], 1), shown.view(-1, 1))
        self.counter += 1
        self.tokens.copy_(nxt)


@dataclass
class GenerationStats:
    """Timings of one generate() call (seconds; the GPU synchronised around each phase)."""
    prefill_s: float
    decode_s: float
    decode_steps: int
    batch_size: int
    cuda_graph: bool
    cache_bytes: int

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s else 0.0


def _prompts(input_ids, attention_mask) -> list[torch.Tensor]:
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, length) int64 tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids holds no prompt: shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return list(input_ids)
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    keep = attention_mask.to(input_ids.device).bool()
    prompts = [row[m] for row, m in zip(input_ids, keep)]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(f"attention_mask leaves prompt {empty[0]} without a token")
    return prompts


def _check_options(max_new_tokens, temperature, top_p, prefill_chunk):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")


def graph_capturable(model, cache=None) -> str | None:
    """Why the model's decode step cannot be captured in a CUDA graph (None: it can). A
    converted model decodes through the CUDA kernels in bf16 or fp16 only, and only over cache
    formats the decode kernel serves (``cache``'s layers, when given); other dtypes, formats
    (and builds without the kernels) take the PyTorch reference, which reads lengths on the
    host."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return f"the model is on {param.device}, not on a CUDA device"
    if is_converted(model):
        if param.dtype not in (torch.bfloat16, torch.float16):
            return (f"the converted model is in {param.dtype}; the CUDA decode kernel computes in "
                    "bf16 or fp16 (the reference path it falls back to cannot be captured)")
        if not (ops.has_kernel("mla_decode", param.device)
                and ops.has_kernel("latent_project", param.device)):
            return "this build of mla_ext has no CUDA kernels (built without nvcc)"
        for i, layer in enumerate(getattr(cache, "layers", ())):
            why = ops.decode_kernel_declines(param.dtype, layer.latent_dtype, layer.rope_dtype,
                                             layer.rope_dim)
            if why is not None:
                return f"layer {i}'s cache: the CUDA decode kernel does not take {why}"
    return None


def make_cache(model, batch_size: int, max_length: int, cache_dtype: str | None = None,
               rope_dtype: str | None = None, block_size: int = 64):
    """The static cache generate() uses: a LatentCache for a converted model, else a
    StaticKVCache in the model's dtype."""
    if is_converted(model):
        return LatentCache(model, cache_dtype=cache_dtype, rope_dtype=rope_dtype,
                           block_size=block_size, max_length=max_length, batch_size=batch_size)
    if cache_dtype is not None or rope_dtype is not None:
        raise ValueError("cache_dtype and rope_dtype choose a converted model's latent cache; an "
                         "unconverted model caches K/V in its own dtype")
    return StaticKVCache(model, batch_size, max_length)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, cache, prompts, prefill_chunk: int = 2048, progress: bool = False):
    """Each prompt into its row of ``cache``, in chunks; returns the last position's logits of
    every prompt, (B, V)."""
    device = next(model.parameters()).device
    logits = []
    for b, prompt in enumerate(tqdm(prompts, desc="prefill", disable=not progress)):
        row = cache.row(b)
        prompt = prompt.to(device)
        for start in range(0, prompt.numel(), prefill_chunk):
            chunk = prompt[start:start + prefill_chunk].view(1, -1)
            positions = torch.arange(start, start + chunk.shape[1], device=device).view(1, -1)
            out = model(input_ids=chunk, position_ids=positions, past_key_values=row,
                        use_cache=True, logits_to_keep=1)
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = 128, *,
             cache_dtype: str | None = None, rope_dtype: str | None = None,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id=None,
             pad_token_id: int | None = None, cuda_graph: bool | None = None,
             prefill_chunk: int = 2048, block_size: int = 64, seed: int | None = None,
             return_stats: bool = False, progress: bool = False):
    """Generate up to ``max_new_tokens`` tokens for every prompt of a batch.

    input_ids: (B, P) int64; attention_mask: (B, P), 0 for padding (left or right) or None.
    cache_dtype / rope_dtype: a converted model's latent cache format (default: each layer's
    stored format, bf16 where none is stored; see LatentCache); an unconverted model caches K/V
    in its own dtype.
    temperature: 0 is greedy; else softmax sampling at this temperature, restricted to the
    smallest set of tokens whose probability reaches ``top_p``.
    eos_token_id: an int or a list; a sequence that makes one is finished and padded with
    ``pad_token_id`` (default: the first EOS id, else 0).
    cuda_graph: replay one captured decode step per token (default: wherever the step can be
    captured, see ``graph_capturable``).
    prefill_chunk: prompt tokens per prefill forward pass. seed: seeds torch's generators.
    Returns (B, P + n) int64: input_ids followed by the n generated tokens (n <= max_new_tokens);
    with return_stats, (sequences, GenerationStats).
    """
    _check_options(max_new_tokens, temperature, top_p, prefill_chunk)
    require_model(model)
    prompts = _prompts(input_ids, attention_mask)
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids holds token ids in [{lo}, {hi}], but the model's vocabulary "
                         f"has {vocab} (ids 0 to {vocab - 1})")
    device = next(model.parameters()).device
    batch = len(prompts)
    cache = make_cache(model, batch, max(p.numel() for p in prompts) + max_new_tokens,
                       cache_dtype, rope_dtype, block_size)
    capturable = graph_capturable(model, cache)
    if cuda_graph is None:
        cuda_graph = capturable is None
    elif cuda_graph and capturable is not None:
        raise ValueError(f"cuda_graph=True: {capturable}")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        t0 = time.perf_counter()
        first = sample_tokens(prefill(model, cache, prompts, prefill_chunk, progress),
                              temperature, top_p)
        _sync(device)
        t1 = time.perf_counter()
        output = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        output[:, 0] = first
        step = DecodeStep(model, cache, first.clone(), output, eos_ids, pad, temperature, top_p)
        steps = _decode(step, cache, max_new_tokens - 1, cuda_graph, eos_ids is not None,
                        progress)
        _sync(device)
        t2 = time.perf_counter()
    finally:
        model.train(was_training)
    new = output[:, :steps + 1].to(input_ids.device)
    sequences = torch.cat([input_ids, new], dim=1)
    if not return_stats:
        return sequences
    return sequences, GenerationStats(t1 - t0, t2 - t1, steps, batch, cuda_graph, cache.nbytes())


def _decode(step: DecodeStep, cache, n: int, cuda_graph: bool, stop_at_eos: bool,
            progress: bool) -> int:
    """Run up to n decode steps; returns how many ran."""
    graph = None
    done = replays = 0
    with tqdm(total=n, desc="decode", disable=not progress) as bar:
        while done < n:
            if stop_at_eos and done % EOS_CHECK_EVERY == 0 and bool(step.finished.all()):
                break
            if graph is None and cuda_graph and done >= 1:
                graph = capture(step)
            if graph is not None:
                graph.replay()
                replays += 1
            else:
                step()   # eager: advances the host bookkeeping itself
            done += 1
            bar.update(1)
    # the replays advanced only the device lengths; the cache was sized for all n steps
    cache.advance(replays)
    return done


def capture(step) -> "torch.cuda.CUDAGraph":
    """Record one call of ``step`` (already run once eagerly, so that every lazy allocation and
    kernel choice is made) into a CUDA graph; the capture runs nothing."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        step()
    return graph
