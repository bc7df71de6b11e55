"""cmath-hpo: CMATH hyperparameter sweeps with Ray Tune, Optuna, ASHA and MLflow.

Import what you need from the submodules; importing this package does not start or import Ray.
"""
