"""nsa: Native Sparse Attention, a pure-PyTorch reference, Triton kernels and a verification harness."""

from nsa.cache import NSACache
from nsa.config import NSAConfig
from nsa.functional import NSAInfo, compressed_cu_seqlens, nsa_attention
from nsa.layer import NSAAttention, NSADecodeInfo

__version__ = "0.1.0"

__all__ = ["NSAAttention", "NSACache", "NSAConfig", "NSADecodeInfo", "NSAInfo", "__version__",
           "compressed_cu_seqlens", "nsa_attention"]
