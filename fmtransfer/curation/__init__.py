"""Data curation: near-duplicate removal, hierarchical k-means with resampling, balanced sampling.

Pure array-in / array-out functions over embeddings ``(n, d) float32`` (memory-mapped files work: points are
read in bounded batches). Following Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach", written from the paper.
"""
