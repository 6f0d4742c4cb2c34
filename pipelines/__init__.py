"""Sampling: the class-conditional pipeline with classifier-free guidance."""

from .pipeline_class_conditional import ClassConditionalPipeline

__all__ = ["ClassConditionalPipeline"]
