"""Retrieval quality of post embeddings: P@k, recall, nDCG, MRR, MAP, sliced by view and label (numpy only)."""
