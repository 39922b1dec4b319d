"""ClusterNS: clustering-aware negative sampling for unsupervised sentence embeddings.

Each stage of the pipeline is a module with a ``main()`` (``python -m clusterns.<stage>``);
the math lives in small pure modules (``clustering``, ``losses``, ``objective``).
"""

__version__ = "0.1.0"
