"""Federated transfer fine-tuning and personalization (not yet implemented)."""
