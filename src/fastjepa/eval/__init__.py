"""Evaluation of frozen encoders: feature extraction (features), linear probe (linear_probe), kNN (knn)."""
