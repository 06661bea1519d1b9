"""The costs stage: MACs and parameters counted and estimated, latency measured on the device (lookup table,
remote device agent), and the budgets the search asks (`estimate(plan)`, `measure(model)`)."""
