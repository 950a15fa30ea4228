from nsa.ops.selected_attention.naive import selected_attention, selected_positions_mask

__all__ = ["selected_attention", "selected_positions_mask"]
