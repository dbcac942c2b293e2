"""Small helpers shared by training, inference and evaluation."""
