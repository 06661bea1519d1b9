"""The search stage: the space (bounds, projection, warm starts), the objective, strategies, and two backends
(Optuna in process: `study`; Ray Tune: `ray_backend`) over shared study plumbing (`studies`)."""
