"""Test helpers the suite ships, like ``torch.testing``: ``cuda_standin`` runs CUDA code paths on a CPU-only machine."""
