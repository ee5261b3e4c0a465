"""Turning a hospital's slide manifest into feature bags and a site summary."""
