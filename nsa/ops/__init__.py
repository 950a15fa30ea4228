"""NSA sub-ops. Each op has its own folder with a pure-PyTorch reference (``naive.py``) and,
where one exists, its Triton kernels; every op is usable on its own."""

from nsa.ops.combine import combine_branches
from nsa.ops.compressed_attention import compressed_attention, visible_compressed
from nsa.ops.compression import compress_mean, compression_blocks
from nsa.ops.reads import compressed_reads, selected_reads, window_reads
from nsa.ops.selected_attention import selected_attention, selected_positions_mask
from nsa.ops.selection import distinct_blocks_per_list, eq9_weights, select_blocks, selection_block_scores
from nsa.ops.window_attention import window_attention

__all__ = [
    "combine_branches", "compress_mean", "compressed_attention", "compressed_reads",
    "compression_blocks", "distinct_blocks_per_list", "eq9_weights", "select_blocks", "selected_attention",
    "selected_positions_mask", "selected_reads", "selection_block_scores", "visible_compressed",
    "window_attention", "window_reads",
]
