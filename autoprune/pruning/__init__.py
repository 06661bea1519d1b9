"""The pruning stage: prunable groups (one Torch-Pruning dependency graph), pruning functions for the layer types
Torch-Pruning lacks (`layers`), importance criteria, plans, least-squares reconstruction and fine-tuning schedules."""
