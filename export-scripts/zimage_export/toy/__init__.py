"""The trained toy Z-Image model: synthetic scenes with captions, and its training (train_toy.py)."""
