"""Evaluation: the single embedding runtime (embedding), the contract every evaluator shares
(base), and one module per evaluator (sts, transfer)."""
