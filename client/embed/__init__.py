"""Patch encoders and feature extraction."""
