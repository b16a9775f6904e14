"""Data: prompt sources, teacher answer generation, tokenised datasets and batches."""
