"""Evaluation: rule-based judge and accuracy metrics for the captioned shapes, a learned judge for the glyphs,
label-free image-quality checks (patch seams, collapse to the mean, diversity), and the field's metrics (FID, KID, CLIP
score, BLEU / CIDEr, perplexity) through maintained libraries on any captioned data."""

from transfusion_hf.evaluation.feature_extractors import (
    ShapesFeatureExtractor,
    load_feature_extractor,
    load_shapes_feature_extractor,
    save_feature_extractor,
)
from transfusion_hf.evaluation.field_metrics import (
    FIELD_METRICS,
    FieldEvaluation,
    FieldMetrics,
    caption_scores,
    evaluate_pipeline,
    metrics_table,
    text_perplexity,
)
from transfusion_hf.evaluation.glyph_judge import (
    GlyphJudge,
    GlyphJudgement,
    glyph_caption_accuracy,
    glyph_text_to_image_accuracy,
    judge_glyph,
    load_glyph_judge,
)
from transfusion_hf.evaluation.image_quality import diversity_score, mean_image_score, sharpness_score, tile_seam_score
from transfusion_hf.evaluation.judge import JudgeResult, judge_image, judge_image_details, to_rgb_array
from transfusion_hf.evaluation.metrics import ATTRIBUTES, caption_accuracy, text_to_image_accuracy
from transfusion_hf.evaluation.shapes_edit_benchmark import ShapesEditEvaluation, edit_accuracy, evaluate_shapes_edit

__all__ = [
    "ATTRIBUTES",
    "FIELD_METRICS",
    "FieldEvaluation",
    "FieldMetrics",
    "ShapesEditEvaluation",
    "ShapesFeatureExtractor",
    "caption_scores",
    "evaluate_pipeline",
    "load_feature_extractor",
    "load_shapes_feature_extractor",
    "metrics_table",
    "save_feature_extractor",
    "text_perplexity",
    "GlyphJudge",
    "GlyphJudgement",
    "JudgeResult",
    "caption_accuracy",
    "diversity_score",
    "edit_accuracy",
    "evaluate_shapes_edit",
    "glyph_caption_accuracy",
    "glyph_text_to_image_accuracy",
    "judge_glyph",
    "judge_image",
    "judge_image_details",
    "load_glyph_judge",
    "mean_image_score",
    "sharpness_score",
    "text_to_image_accuracy",
    "tile_seam_score",
    "to_rgb_array",
]
