from nsa.ops.selection.naive import eq9_weights, select_blocks, selection_block_scores

__all__ = ["eq9_weights", "select_blocks", "selection_block_scores"]
