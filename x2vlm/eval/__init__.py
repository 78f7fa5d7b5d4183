"""Evaluation: image-text and video-text retrieval (ITC, then ITM re-rank), grounding (text -> box), the
direction-of-motion probe and video QA."""
