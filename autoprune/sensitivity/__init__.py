"""The sensitivity stage: how a pruned candidate scores (reconstruction, BN recalibration, the task's metric) and
the per-group sweep."""
