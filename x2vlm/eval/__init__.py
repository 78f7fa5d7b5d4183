"""Evaluation: image-text retrieval (ITC, then ITM re-rank) and grounding (text -> box)."""
