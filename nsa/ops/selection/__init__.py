from nsa.ops.selection.naive import eq9_weights, select_blocks, selection_block_scores
from nsa.ops.selection.overlap import distinct_blocks_per_list

__all__ = ["distinct_blocks_per_list", "eq9_weights", "select_blocks", "selection_block_scores"]
