"""Small language models for the trainability study: NSA and its dense twin, synthetic
retrieval tasks and the training loop (``nsa train``; see docs/TRAINING.md)."""

from nsa.models.lm import DenseAttention, LMConfig, RetrievalLM, nsa_only_parameters, parameter_group
from nsa.models.tasks import RetrievalBatch, RetrievalCount, RetrievalTask, make_batch, retrieval_accuracy

__all__ = ["DenseAttention", "LMConfig", "RetrievalBatch", "RetrievalCount", "RetrievalLM", "RetrievalTask",
           "make_batch",
           "nsa_only_parameters", "parameter_group", "retrieval_accuracy"]
