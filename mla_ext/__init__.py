"""mla_ext: MHA2MLA conversion of Llama models and kernels over a compressed latent KV cache.

    import mla_ext
    model, tok = mla_ext.load_default_model()
    cfg = mla_ext.MLAConfig()            # rotation RoPE, activation-score SVD, -81.25 % budget
    calib = mla_ext.calibrate(model, tok, mla_ext.default_calibration_text(),
                              **cfg.calibration_options())
    mla_ext.convert_to_mla(model, cfg, calibration=calib)
    out = model.generate(ids, past_key_values=mla_ext.LatentCache(model, cache_dtype="int4"))
    out = mla_ext.generate(model, ids, max_new_tokens=64, cache_dtype="int4")   # CUDA graphs
"""
from ._loader import built_with_cuda, load_extension

load_extension()

from . import ops, reference  # noqa: E402
from .config import MLAConfig  # noqa: E402
from .convert import calibrate  # noqa: E402
from .data import default_calibration_text, default_evaluation_text  # noqa: E402
from .eval import chat, chat_answers, perplexity  # noqa: E402
from . import generation  # noqa: E402
from .generation import generate  # noqa: E402
from .modeling import (  # noqa: E402
    LatentCache, MLAAttention, convert_to_mla, kv_cache_bytes_per_token, load_pretrained,
    save_pretrained)
from .modeling.kv_cache import StaticKVCache  # noqa: E402
from .models import load_default_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["MLAConfig", "calibrate", "convert_to_mla", "LatentCache", "MLAAttention",
           "kv_cache_bytes_per_token", "perplexity", "chat", "chat_answers",
           "save_pretrained", "load_pretrained",
           "load_default_model", "default_calibration_text", "default_evaluation_text", "ops",
           "reference", "built_with_cuda", "generate", "generation", "StaticKVCache"]
