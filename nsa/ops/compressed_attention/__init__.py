from nsa.ops.compressed_attention.naive import compressed_attention, visible_compressed

__all__ = ["compressed_attention", "visible_compressed"]
