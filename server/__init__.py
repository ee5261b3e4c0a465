"""Coordinator side of fedpath (Flower ServerApp, aggregation, checkpoints, run reports).

It never sees slides: only model parameters and aggregate metrics from the hospitals."""
