"""The pruning stage: prunable groups (one Torch-Pruning dependency graph), importance criteria, plans,
least-squares reconstruction and fine-tuning schedules."""
