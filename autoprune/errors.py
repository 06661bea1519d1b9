"""User-facing errors: one clear message, exit code 2, no traceback unless --debug."""

from __future__ import annotations


class AutopruneError(Exception):
    """Bad input or an impossible request. The message says what is wrong and what to change."""

    exit_code = 2


class BudgetUnreachableError(AutopruneError):
    """The budget is below the smallest model the pruning settings can reach."""


class TrialFailed(RuntimeError):
    """An evaluation that produced no usable metric (NaN/inf, exception, out of memory, a dead latency agent):
    the trial is recorded as failed and the study goes on. Not an input error, so not an AutopruneError."""
