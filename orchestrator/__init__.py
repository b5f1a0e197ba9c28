"""Ray Tune sweep orchestrator around cdl_core (Ray, MLflow and Optuna live here, never in cdl_core)."""
