"""Measuring detectors: metrics, evaluation on MVTec-layout test splits, the benchmark, reports
and heatmap visualisation."""

from anomalens.evaluation.evaluator import Evaluation, evaluate, fit_and_evaluate

__all__ = ["Evaluation", "evaluate", "fit_and_evaluate"]
