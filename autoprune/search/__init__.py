"""Search stage: the space (bounds, projection, warm starts), the objective, strategies and backends."""

from autoprune.search.space import Budget, SearchSpace
from autoprune.search.study import run_search

__all__ = ["Budget", "SearchSpace", "run_search"]
