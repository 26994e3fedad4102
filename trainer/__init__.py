"""Trainer: datasets, frozen-encoder features, the EM3/LEMUR model, losses, training and evaluation."""
