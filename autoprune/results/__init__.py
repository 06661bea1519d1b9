"""The results stage: tables of trials, the re-measured best plan and the Pareto front; plotly figures and the
HTML report."""
