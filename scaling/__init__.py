"""Scaling studies over onerec_jax runs: the rung ladder, resumable sweeps, float64 fits, plots.

The modules arrive with the model and training issues; the package is installed from the start so
that notebooks and scripts can depend on its name.
"""
