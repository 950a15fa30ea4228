from nsa.ops.combine.naive import combine_branches

__all__ = ["combine_branches"]
