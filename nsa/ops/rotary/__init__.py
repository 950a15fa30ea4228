from nsa.ops.rotary.naive import rotate_half

__all__ = ["rotate_half"]
