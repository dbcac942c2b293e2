"""Attention, masks and tangent rules: the numerical core shared by models and kernels."""
