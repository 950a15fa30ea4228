from nsa.ops.window_attention.naive import window_attention

__all__ = ["window_attention"]
