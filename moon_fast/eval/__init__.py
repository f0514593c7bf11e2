"""Zero-shot evaluation (MBE2.0 style): retrieval across compositions, classification and attribute
prediction. :func:`evaluate_checkpoint` is the entry point; :mod:`moon_fast.eval.metrics` the metrics."""

from moon_fast.eval.evaluate import (
    ALL_TASKS,
    RETRIEVAL_TASKS,
    evaluate_checkpoint,
    evaluate_embeddings,
    format_comparison,
    format_results,
    load_eval,
)
from moon_fast.eval.metrics import chunked_topk, classification_metrics, correct_ranks, retrieval_metrics

__all__ = [
    "ALL_TASKS", "RETRIEVAL_TASKS", "evaluate_checkpoint", "evaluate_embeddings", "format_comparison",
    "format_results", "load_eval", "chunked_topk", "classification_metrics", "correct_ranks", "retrieval_metrics",
]
