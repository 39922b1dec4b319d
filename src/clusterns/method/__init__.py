"""ClusterNS's method as pure tensor functions: the modified K-means (clustering), the losses, the
composed per-step objective and its validated settings (torch-free)."""
