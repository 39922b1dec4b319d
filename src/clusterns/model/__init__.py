"""Models: backbone + poolers + the training-only MLP (encoder), the padding-free training forward
(packed), PromptBERT templates and the prompt encoder (prompt), and the export of trained models."""
