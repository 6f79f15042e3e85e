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


@torch.no_grad()
def perplexity(model, tokenizer, text, context: int = 1024, stride: int = 512,
               max_tokens: int | None = None, progress: bool = True,
               cache_dtype: str | None = None, chunk_size: int = 64,
               rope_dtype: str | None = None) -> float:
    """exp(mean NLL) over every token of ``text`` after the first, each scored once.

    Windows of ``context`` tokens start every ``stride`` tokens; a window scores only the tokens
    the previous window did not, with the rest as context (the standard sliding-window
    protocol). ``max_tokens`` truncates the text for quick runs.

    cache_dtype: for a converted model, feed each window in chunks of ``chunk_size`` tokens
    through a ``LatentCache`` of that format, so that every earlier chunk is read back from the
    (quantized) cache, as in serving; None runs each window in one pass without a cache.
    rope_dtype: the cache's RoPE-key format (LatentCache's default when None).
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context > limit:
        raise ValueError(f"context {context} exceeds the model's {limit} positions")
    ids = tokenize(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count, scored_to = 0.0, 0, 1
    starts = list(range(0, max(ids.numel() - 1, 1), stride))
    try:
        for begin in tqdm(starts, desc="perplexity", disable=not progress):
            end = min(begin + context, ids.numel())
            if end <= scored_to:
                continue
            window = ids[begin:end].to(device).unsqueeze(0)
            logits = _window_logits(model, window, cache_dtype, chunk_size,
                                    rope_dtype)[0, :-1].float()
            targets = window[0, 1:]
            # first target not scored yet; a window's own first token has no context in it, so
            # with stride == context each window's first token goes unscored (standard protocol)
            first = max(0, scored_to - begin - 1)
            losses = torch.nn.functional.cross_entropy(logits[first:], targets[first:],
                                                       reduction="sum")
            nll += float(losses)
            count += targets.numel() - first
            scored_to = end
            if end == ids.numel():
                break
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def _window_logits(model, window, cache_dtype, chunk_size, rope_dtype=None):
    if cache_dtype is None:
        return model(window, use_cache=False).logits
    from .modeling.cache import LatentCache

    cache = LatentCache(model, cache_dtype=cache_dtype, rope_dtype=rope_dtype)
    return torch.cat([model(window[:, s:s + chunk_size], past_key_values=cache).logits
                      for s in range(0, window.shape[1], chunk_size)], dim=1)


@torch.no_grad()
def chat(model, tokenizer, prompt: str, max_new_tokens: int = 48, cache=None) -> str:
    """Greedy answer of a chat model to one user message (``cache`` e.g. a LatentCache)."""
    messages = [{"role": "user", "content": prompt}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    device = next(model.parameters()).device
    ids = enc["input_ids"].to(device)
    out = model.generate(ids, attention_mask=enc["attention_mask"].to(device),
                         past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
