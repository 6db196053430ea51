"""FineScope stage 1: SAE-guided domain curation (coordinate selection, TopK SAE, pooled codes, retrieval, baselines).

Plain torch/numpy; the Ray glue is ``ray_jobs/curate.py``.
"""
