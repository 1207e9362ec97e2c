"""Flax backend of riceFM (model, objective, training); built on the shared core in ``ricefm``."""
