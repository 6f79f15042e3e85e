"""The converted attention module, the latent cache and its sequences, the original model's
static K/V cache, the swap into a model, checkpoints."""
from .attention import MLAAttention
from .cache import LatentCache, LatentCacheLayer, kv_cache_bytes_per_token
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .patch import build_mla_structure, convert_to_mla

__all__ = ["MLAAttention", "LatentCache", "LatentCacheLayer", "kv_cache_bytes_per_token",
           "CheckpointError", "load_pretrained", "save_pretrained", "build_mla_structure",
           "convert_to_mla"]
