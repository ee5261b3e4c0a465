"""Slide reading, tissue segmentation, patching, annotations and synthetic slides."""
