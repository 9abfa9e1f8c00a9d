"""Federated transfer fine-tuning and personalization: starting weights (``weights``), which
parameters are shared, frozen or personal (``layout``), and personal training (``personal``)."""
