"""Distillation: a smaller student trained to match a teacher's token distributions, saved as
a Hugging Face folder that metroline loads like any model (and uses as a speculative draft)."""

from metroline.distill.train import DistillConfig, distill, save_student

__all__ = ["DistillConfig", "distill", "save_student"]
