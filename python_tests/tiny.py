"""Tiny random Llama models for fast tests."""
import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mla_ext

VOCAB = 101


def tiny_config(heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2, bias=False, vocab_size=VOCAB,
                rope_scaling=None, **extra):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       vocab_size=vocab_size, attention_bias=bias, rope_parameters=rope,
                       max_position_embeddings=256, **extra)


def tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kwargs)).eval()
    # random init leaves the model nearly uniform; larger q/k make attention (and RoPE) matter
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
            if kwargs.get("bias"):
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    return model


def converted(model, **cfg):
    """A converted copy; without calibration, so the weight SVD unless a test says otherwise."""
    cfg.setdefault("svd", "joint")
    return mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(**cfg), progress=False)


LOSSLESS = dict(rope_strategy="high", rope_pairs=None, d_kv=None, svd="joint")
