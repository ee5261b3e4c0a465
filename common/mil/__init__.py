"""Attention-MIL models, mixed-supervision losses and slide sampling (DESIGN §4.3-4.4).

Shared by the hospital side (local and federated training) and the server (evaluation of the
global model), so it depends on torch and numpy only.
"""
