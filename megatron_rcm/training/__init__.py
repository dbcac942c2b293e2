"""Phased trainer: teacher -> TF consistency distillation -> self-forcing DMD."""
