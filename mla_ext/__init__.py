"""mla_ext: MHA2MLA conversion of Llama models and kernels over a compressed latent KV cache."""
from ._loader import built_with_cuda, load_extension

load_extension()

from . import ops, reference  # noqa: E402

__version__ = "0.1.0"
