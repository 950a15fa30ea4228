from nsa.ops.compression.naive import compress_mean, compression_blocks
from nsa.ops.compression.strided import compress_mean_backward, compress_mean_strided

__all__ = ["compress_mean", "compress_mean_backward", "compress_mean_strided", "compression_blocks"]
