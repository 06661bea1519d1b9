"""The model & task stage: load the user's factories (model, data, task), the built-in zoo and datasets, and
training. Nothing here knows about pruning."""
