"""Quality numbers for few-step students against many-step teachers (docs/design.md, "Evaluation and the embedded default")."""
from .extractor import VideoFeatureExtractor, classifier_accuracy, train_feature_extractor
from .metrics import (evaluate_samples, frechet_distance, frechet_distance_gaussians, per_frame_mse,
                      psnr_from_mse)

__all__ = ["VideoFeatureExtractor", "classifier_accuracy", "train_feature_extractor", "evaluate_samples",
           "frechet_distance", "frechet_distance_gaussians", "per_frame_mse", "psnr_from_mse"]
