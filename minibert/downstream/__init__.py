"""Downstream use of the pretrained encoder: task data, fine-tuning and its controls."""
