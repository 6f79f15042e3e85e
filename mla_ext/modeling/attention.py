"""MLAAttention: the converted attention layer, a drop-in for the attention of every supported
family (LlamaAttention, MistralAttention, Qwen2Attention, GemmaAttention, Phi3Attention).

Per head, queries and keys are laid out ``[x1 (r) | x2 (r) | nope (d_h - d_r)]`` (ARCHITECTURE
2.1): the first ``d_r`` dims carry partial RoPE, the rest are position-free. Keys' NoPE part and
the values come from one shared latent ``c = kv_down(x)`` (section 2.2).

Two ways to attend (section 3):
- reconstruct: rebuild K and V from the latent and call the model's attention function (SDPA,
  eager, ...); used for prefill, training and whenever the mask is not plain causal;
- absorbed: fold ``k_up`` into the query and ``v_up`` into the output and attend over the
  latent cache directly (``ops.mla_decode``); used for decode steps over a LatentCache.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import families, ops
from .sequences import SteppedCache, additive_mask

# Decode steps with at most this many new tokens per sequence use the absorbed kernel.
MAX_ABSORBED_QUERIES = 8
DECODE_MODES = ("auto", "absorbed", "reconstruct")


def _per_token(angles: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """(B or 1, T, H_kv, r) -> (B * T, H_kv, r): the rotary embedding may broadcast one set of
    positions over the batch."""
    return angles.expand(b, t, *angles.shape[2:]).reshape(b * t, *angles.shape[2:])


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial RoPE on x (B, T, heads, d_r) with cos/sin (B, T, H_kv, r)."""
    b, t, heads, d_r = x.shape
    flat = x.reshape(b * t, heads, d_r).contiguous()
    out = ops.partial_rope(flat, _per_token(cos, b, t).contiguous(),
                           _per_token(sin, b, t).contiguous())
    return out.view(b, t, heads, d_r)


class MLAAttention(nn.Module):
    """Multi-head latent attention converted from a family's attention module (MHA2MLA).

    Weights (the checkpoint contract, ARCHITECTURE 2.3): q_proj [H (d_r + n), d],
    kr_proj [H_r d_r, d], kv_down [D_c, d], k_up [H_kv n, D_c], v_up [H_kv d_h, D_c],
    o_proj [d, H d_h], buffer rope_pairs [H_r, r] int64 (the frequency pair of each stored RoPE
    pair). ``H_r`` (``rope_heads``) is the number of RoPE keys per token: ``H_kv`` (one per KV
    head, the default) or 1 (one key shared by every head, ARCHITECTURE 2.5); ``n``
    (``nope_dim``) the position-free dims per head, ``d_h - d_r`` by default.

    cache_format: the layer's stored cache format (a ``CacheFormat``), the default of a
    ``LatentCache`` of the model; None: bf16.

    biases: which original projections (q, k, v, o) carry a bias; the query's goes to q_proj,
    the key's to kr_proj and k_up, the value's to v_up, the output's to o_proj. Default: the
    family of ``config`` (mla_ext/families.py), else ``config.attention_bias`` for all four.
    """

    def __init__(self, config, layer_idx: int, rope_pairs: int, latent_dim: int,
                 biases: dict | None = None, rope_heads: int | None = None,
                 nope_dim: int | None = None, cache_format=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.num_rope_heads = self.num_kv_heads if rope_heads is None else rope_heads
        if self.num_rope_heads not in (1, self.num_kv_heads):
            raise ValueError(f"rope_heads must be 1 (a shared RoPE key) or the {self.num_kv_heads} "
                             f"KV heads, got {rope_heads}")
        self.rope_pairs_count = rope_pairs
        self.rope_dim = 2 * rope_pairs
        self.nope_dim = self.head_dim - self.rope_dim if nope_dim is None else nope_dim
        if self.nope_dim < 0:
            raise ValueError(f"{rope_pairs} RoPE pairs leave no room in head_dim {self.head_dim}: "
                             "give nope_dim")
        self.query_dim = self.rope_dim + self.nope_dim
        self.latent_dim = latent_dim
        self.cache_format = cache_format
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.decode_mode = "auto"

        if biases is None:
            family = families.family_for_config(config)
            biases = (family.biases(config) if family is not None else
                      dict.fromkeys(families.PROJECTIONS, bool(getattr(config, "attention_bias",
                                                                        False))))
        with warnings.catch_warnings():
            # full RoPE leaves k_up with no rows; torch warns that it cannot initialise them
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self._make_projections(config.hidden_size, latent_dim, biases)
        self.register_buffer(
            "rope_pairs", torch.zeros(self.num_rope_heads, rope_pairs, dtype=torch.long))

    def _make_projections(self, d, latent_dim, biases):
        self.q_proj = nn.Linear(d, self.num_heads * self.query_dim, bias=biases["q"])
        self.kr_proj = nn.Linear(d, self.num_rope_heads * self.rope_dim, bias=biases["k"])
        self.kv_down = nn.Linear(d, latent_dim, bias=False)
        self.k_up = nn.Linear(latent_dim, self.num_kv_heads * self.nope_dim, bias=biases["k"])
        self.v_up = nn.Linear(latent_dim, self.num_kv_heads * self.head_dim, bias=biases["v"])
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=biases["o"])

    def extra_repr(self) -> str:
        shared = f", rope_heads={self.num_rope_heads}" if self.num_rope_heads != self.num_kv_heads \
            else ""
        fmt = f", cache_format={self.cache_format.spec}" if self.cache_format else ""
        return (f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, rope_pairs={self.rope_pairs_count}{shared}, "
                f"nope_dim={self.nope_dim}, latent_dim={self.latent_dim}{fmt}")

    # ------------------------------------------------------------------ pieces

    def rope_angles(self, position_embeddings):
        """cos/sin of the kept pairs, (B, T, H_r, r), gathered from the model's own rotary
        embedding so that every rope scaling type stays exact."""
        cos, sin = position_embeddings
        half = self.head_dim // 2
        return cos[..., :half][..., self.rope_pairs], sin[..., :half][..., self.rope_pairs]

    def query(self, hidden_states, cos, sin):
        """Queries (B, T, H, d_r + n) with their first d_r dims rotated."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.query_dim)
        return torch.cat([_rope(q[..., :self.rope_dim], cos, sin), q[..., self.rope_dim:]], dim=-1)

    def key_latent(self, hidden_states, cos, sin):
        """Rotated RoPE keys (B, T, H_r, d_r) and the latent (B, T, D_c)."""
        b, t, _ = hidden_states.shape
        k_rope = self.kr_proj(hidden_states).view(b, t, self.num_rope_heads, self.rope_dim)
        return _rope(k_rope, cos, sin), self.kv_down(hidden_states)

    def write_new_tokens(self, layer, step, hidden_states, cos, sin) -> None:
        """Project the new tokens' latents and RoPE keys into the cache slots of ``step`` (the
        fused ops.latent_project)."""
        b, t, d = hidden_states.shape
        ops.latent_project(hidden_states.reshape(b * t, d).contiguous(), self.kv_down.weight,
                           self.kr_proj.weight, self.kr_proj.bias,
                           _per_token(cos, b, t).contiguous(), _per_token(sin, b, t).contiguous(),
                           step.slots, *layer.tensors(), check_ranges=ops.debug_checks_enabled())

    def reconstruct_kv(self, latent, k_rope):
        """Keys (B, H_kv, T, d_r + n) as [k_rope | k_up(c)] and values (B, H_kv, T, d_h); a
        shared RoPE key serves every KV head."""
        b, t, _ = latent.shape
        k_nope = self.k_up(latent).view(b, t, self.num_kv_heads, self.nope_dim)
        k_rope = k_rope.to(k_nope.dtype)
        if self.num_rope_heads != self.num_kv_heads:
            k_rope = k_rope.expand(b, t, self.num_kv_heads, self.rope_dim)
        keys = torch.cat([k_rope, k_nope], dim=-1)
        values = self.v_up(latent).view(b, t, self.num_kv_heads, self.head_dim)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def absorb_query(self, q_nope):
        """q_lat[h] = q_nope[h] @ W_uk[g]: (B, T, H, d_h - d_r) -> (B, T, H, D_c). k_up's bias adds
        the same score to every key of a query, which softmax cancels, so it is left out."""
        b, t = q_nope.shape[:2]
        w_uk = self.k_up.weight.view(self.num_kv_heads, self.nope_dim, self.latent_dim)
        q = q_nope.reshape(b, t, self.num_kv_heads, self.num_key_value_groups, self.nope_dim)
        return torch.einsum("btgqn,gnc->btgqc", q, w_uk.to(q.dtype)).reshape(
            b, t, self.num_heads, self.latent_dim)

    def expand_output(self, o_lat):
        """o[h] = o_lat[h] @ W_uv[g]^T + b_v: (B, T, H, D_c) -> (B, T, H d_h)."""
        b, t = o_lat.shape[:2]
        w_uv = self.v_up.weight.view(self.num_kv_heads, self.head_dim, self.latent_dim)
        o = o_lat.reshape(b, t, self.num_kv_heads, self.num_key_value_groups, self.latent_dim)
        out = torch.einsum("btgqc,gdc->btgqd", o, w_uv.to(o.dtype))
        if self.v_up.bias is not None:
            out = out + self.v_up.bias.view(self.num_kv_heads, 1, self.head_dim).to(out.dtype)
        return out.reshape(b, t, self.num_heads * self.head_dim)

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        # transformers renamed the decoder layer's `past_key_values` argument to `cache` (5.2x)
        past_key_values = cache if cache is not None else past_key_values
        b, t, _ = hidden_states.shape
        cos, sin = self.rope_angles(position_embeddings)
        q = self.query(hidden_states, cos, sin)

        if isinstance(past_key_values, SteppedCache):
            step = past_key_values.begin_step(self.layer_idx, hidden_states, attention_mask)
            layer = past_key_values.layers[self.layer_idx]
            if self._use_absorbed(t, step):
                with torch.no_grad():
                    self.write_new_tokens(layer, step, hidden_states, cos, sin)
                return self._absorbed(q, layer, step), None
            keys, values, attention_mask = self._reconstruct_with_cache(
                layer, step, hidden_states, cos, sin, attention_mask, q.dtype)
        else:
            k_rope, latent = self.key_latent(hidden_states, cos, sin)
            keys, values = self.reconstruct_kv(latent, k_rope)
            if isinstance(past_key_values, Cache):
                # Another cache type (e.g. generate()'s default DynamicCache) stores the rebuilt
                # K/V: correct, but none of the latent cache's memory saving.
                keys, values = past_key_values.update(keys, values, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention_interface(
            self, q.transpose(1, 2), keys, values, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(b, t, -1).contiguous()), weights

    def _use_absorbed(self, t: int, step) -> bool:
        """Decided from the cache's host bookkeeping alone (no device read): decode steps of at
        most MAX_ABSORBED_QUERIES new tokens over existing context take the absorbed kernel."""
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        if self.decode_mode == "reconstruct":
            return False
        if self.decode_mode == "absorbed":
            if step.padded:
                raise ValueError("decode_mode='absorbed' cannot prefill a padded batch (the "
                                 "kernel's new tokens are each sequence's last); use 'auto'")
            return True
        return t <= MAX_ABSORBED_QUERIES and step.has_context and not self.training

    def _reconstruct_with_cache(self, layer, step, hidden_states, cos, sin, attention_mask,
                                dtype):
        """Store the new tokens, then rebuild K/V of the context and the new tokens. A prefill
        uses the model's mask; a continuation of sequences of unequal lengths (padding skipped
        at the prefill) gets a mask of its own from the cache's lengths."""
        k_rope, latent = self.key_latent(hidden_states, cos, sin)
        layer.write(latent.detach(), k_rope.detach(), step.slots)
        if not step.has_context:
            keys, values = self.reconstruct_kv(latent, k_rope)
            return keys, values, attention_mask
        past_c, past_kr = ops.latent_gather(*layer.tensors(), layer.block_table, step.past_lens,
                                            step.past_length)
        keys, values = self.reconstruct_kv(torch.cat([past_c.to(latent.dtype), latent], dim=1),
                                           torch.cat([past_kr.to(k_rope.dtype), k_rope], dim=1))
        if not step.uniform:
            attention_mask = _context_mask(step.past_lens, step.past_length, latent.shape[1],
                                           dtype)
        return keys, values, attention_mask

    def _absorbed(self, q, layer, step):
        q_rope, q_nope = q[..., :self.rope_dim], q[..., self.rope_dim:]
        q_lat = self.absorb_query(q_nope).contiguous()
        cache = layer.tensors()
        plan = _step_plan(step, q_lat, cache)
        o_lat, _ = ops.mla_decode(q_lat, q_rope.contiguous(), *cache, layer.block_table,
                                  layer.seq_lens, self.scaling, plan,
                                  check_ranges=ops.debug_checks_enabled())
        return self.o_proj(self.expand_output(o_lat.to(q.dtype)))


def _step_plan(step, q_lat, cache):
    """The decode kernel's split plan for this layer's shapes, made once per step and shared by
    every layer of the same shapes (None where the CUDA kernel does not run)."""
    latent, latent_scale, _, k_rope_cache, _ = cache
    key = (tuple(q_lat.shape), q_lat.dtype, latent.dtype, tuple(latent.shape[1:]),
           None if latent_scale is None else tuple(latent_scale.shape[1:]),
           k_rope_cache.dtype, tuple(k_rope_cache.shape[1:]))
    if key not in step.plans:
        step.plans[key] = ops.mla_decode_plan_if_supported(q_lat, latent, latent_scale,
                                                           k_rope_cache, step.seq_lens)
    return step.plans[key]


def _context_mask(past_lens, past_length: int, t: int, dtype) -> torch.Tensor:
    """Additive (B, 1, t, past_length + t) mask: sequence b's query i sees its first
    past_lens[b] cached tokens and the new tokens 0..i."""
    device = past_lens.device
    past = torch.arange(past_length, device=device).view(1, 1, -1) < past_lens.view(-1, 1, 1)
    new = torch.ones(t, t, dtype=torch.bool, device=device).tril().unsqueeze(0)
    visible = torch.cat([past.expand(-1, t, -1), new.expand(past.shape[0], -1, -1)], dim=-1)
    return additive_mask(visible, dtype).unsqueeze(1)
