"""Perplexity (token-weighted, fixed context and stride) and short chat generations."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def tokenize(tokenizer, text) -> torch.Tensor:
    """One long 1-D tensor of token ids; documents of a list are joined by the EOS token."""
    texts = [text] if isinstance(text, str) else list(text)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for i, t in enumerate(texts):
        ids += (eos if i else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# Logits of one batch of windows stay under this many bytes (fp32), whatever batch_size asks.
_LOGITS_BUDGET = 2**30


@torch.no_grad()
def perplexity(model, tokenizer, text, context: int = 1024, stride: int = 512,
               max_tokens: int | None = None, progress: bool = True,
               cache_dtype: str | None = None, chunk_size: int = 64,
               rope_dtype: str | None = None, batch_size: int = 1,
               through_cache: bool | None = None) -> float:
    """exp(mean NLL) over every token of ``text`` after the first, each scored once.

    Windows of ``context`` tokens start every ``stride`` tokens; a window scores only the tokens
    the previous window did not, with the rest as context (the standard sliding-window
    protocol). ``max_tokens`` truncates the text for quick runs.

    cache_dtype: for a converted model, feed each window in chunks of ``chunk_size`` tokens
    through a ``LatentCache`` of that format, so that every earlier chunk is read back from the
    (quantized) cache, as in serving; None runs each window in one pass without a cache.
    rope_dtype: the cache's RoPE-key format (LatentCache's default when None).
    through_cache: read the context back through a ``LatentCache`` (default: when cache_dtype is
        given); with cache_dtype None the cache takes each layer's stored format.
    batch_size: windows of equal length scored in one forward pass (without a cache): fewer
    launches on a GPU; on a CPU one window at a time is faster (measured: 36 s vs 50 s for 8192
    tokens of the default model at 8). The result does not depend on it beyond rounding.
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context > limit:
        raise ValueError(f"context {context} exceeds the model's {limit} positions")
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    windows = _scored_windows(ids.numel(), context, stride)
    if through_cache is None:
        through_cache = cache_dtype is not None
    if through_cache:
        batch_size = 1  # a LatentCache holds one window
    vocab = getattr(model.config, "vocab_size", None) or 1
    batch_size = max(1, min(batch_size, _LOGITS_BUDGET // (context * vocab * 4)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        with tqdm(total=len(windows), desc="perplexity", disable=not progress) as bar:
            for batch in _batches(windows, batch_size):
                rows = torch.stack([ids[begin:end] for begin, end, _ in batch]).to(device)
                logits = _window_logits(model, rows, through_cache, cache_dtype, chunk_size,
                                        rope_dtype)
                for i, (_, _, first) in enumerate(batch):
                    # first target not scored yet; a window's own first token has no context
                    # in it, so with stride == context each window's first token goes unscored
                    # (the standard protocol)
                    nll += torch.nn.functional.cross_entropy(
                        logits[i, first:-1].float(), rows[i, first + 1:], reduction="sum")
                    count += rows.shape[1] - 1 - first
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return math.exp(float(nll) / count)


def _scored_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) of every window that scores something: ``first`` is the index of its
    first target (window token first + 1) that no earlier window scored."""
    out, scored_to = [], 1
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        if end <= scored_to:
            continue
        out.append((begin, end, max(0, scored_to - begin - 1)))
        scored_to = end
        if end == n:
            break
    return out


def _batches(windows, batch_size):
    """Runs of at most batch_size consecutive windows of one length (the last may be shorter)."""
    batch = []
    for w in windows:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _window_logits(model, window, through_cache, cache_dtype, chunk_size, rope_dtype=None):
    if not through_cache:
        return model(window, use_cache=False).logits
    from .modeling.cache import LatentCache

    cache = LatentCache(model, cache_dtype=cache_dtype, rope_dtype=rope_dtype)
    return torch.cat([model(window[:, s:s + chunk_size], past_key_values=cache).logits
                      for s in range(0, window.shape[1], chunk_size)], dim=1)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one user message in the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: chat answers need an instruct "
                         "model's tokenizer")
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation EOS (for
    SmolLM2 the end of the turn, <|im_end|>, is only the latter)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return sorted({int(i) for i in ids if i is not None})


def _answer_text(tokenizer, tokens, stop_ids) -> str:
    tokens = list(tokens)
    ends = [i for i, t in enumerate(tokens) if t in stop_ids]
    return tokenizer.decode(tokens[:ends[0] if ends else len(tokens)],
                            skip_special_tokens=True).strip()


@torch.no_grad()
def chat_answers(model, tokenizer, prompts, max_new_tokens: int = 48, batch_size: int = 16,
                 cache_dtype: str | None = None, rope_dtype: str | None = None,
                 progress: bool = False) -> list[str]:
    """Greedy answers of a chat model to single user messages, ``batch_size`` prompts per
    ``mla_ext.generate`` call (CUDA-graph decode steps where they can be captured); each answer
    ends before the first stop token (``stop_token_ids``).

    cache_dtype / rope_dtype: a converted model's latent cache format (default bf16); ignored
    for an unconverted model, which caches K/V in its own dtype."""
    from .generation import generate, is_converted

    prompts = list(prompts) if not isinstance(prompts, str) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not is_converted(model):
        cache_dtype = rope_dtype = None
    stop = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    answers = []
    with tqdm(total=len(prompts), desc="answers", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            encoded = [chat_prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
            width = max(len(e) for e in encoded)
            ids = torch.zeros(len(encoded), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, e in enumerate(encoded):
                ids[row, :len(e)] = torch.tensor(e)
                mask[row, :len(e)] = 1
            out = generate(model, ids.to(device), mask.to(device), max_new_tokens,
                           cache_dtype=cache_dtype, rope_dtype=rope_dtype, eos_token_id=stop)
            answers += [_answer_text(tokenizer, row[width:].tolist(), stop) for row in out]
            bar.update(len(encoded))
    return answers


@torch.no_grad()
def chat(model, tokenizer, prompt: str, max_new_tokens: int = 48, cache=None,
         cache_dtype: str | None = None, rope_dtype: str | None = None,
         return_stats: bool = False):
    """Greedy answer of a chat model to one user message.

    Through ``mla_ext.generate`` (a static cache of ``cache_dtype`` / ``rope_dtype`` for a
    converted model, CUDA-graph decode steps where they can be captured); with ``cache`` (e.g. a
    LatentCache) through Hugging Face's ``generate`` instead. return_stats: also return the
    GenerationStats (None with ``cache``)."""
    from .generation import generate

    device = next(model.parameters()).device
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=device)
    mask = torch.ones_like(ids)
    stop = stop_token_ids(model, tokenizer)
    stats = None
    if cache is not None:
        out = model.generate(ids, attention_mask=mask, past_key_values=cache,
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    else:
        out, stats = generate(model, ids, mask, max_new_tokens, cache_dtype=cache_dtype,
                              rope_dtype=rope_dtype, eos_token_id=stop, return_stats=True)
    answer = _answer_text(tokenizer, out[0, ids.shape[1]:].tolist(), stop)
    return (answer, stats) if return_stats else answer
