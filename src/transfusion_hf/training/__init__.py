"""What training needs beyond the model: measurements of a run in progress (more of the training script's pieces
move here with the package's training module)."""

from .conditioning import TextConditioningGap, text_conditioning_gap

__all__ = ["TextConditioningGap", "text_conditioning_gap"]
