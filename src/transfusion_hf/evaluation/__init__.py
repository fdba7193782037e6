"""Evaluation on the captioned-shapes data set: a rule-based judge that reads images back, and accuracy metrics."""

from transfusion_hf.evaluation.judge import JudgeResult, judge_image, judge_image_details, to_rgb_array
from transfusion_hf.evaluation.metrics import ATTRIBUTES, caption_accuracy, text_to_image_accuracy

__all__ = [
    "ATTRIBUTES",
    "JudgeResult",
    "caption_accuracy",
    "judge_image",
    "judge_image_details",
    "text_to_image_accuracy",
    "to_rgb_array",
]
