from nsa.ops.compression.naive import compress_mean, compression_blocks

__all__ = ["compress_mean", "compression_blocks"]
