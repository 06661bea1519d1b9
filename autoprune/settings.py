"""Every setting that does not belong to one spec, in one typed place.

Each field is read from its ``AUTOPRUNE_*`` environment variable once, at a front door: the command line, the
Python API (`autoprune.search`, `autoprune.app.api.session`), the service and the device agent call
`configure()` when they start; the stages below only call `get()`. The README's Settings table lists them.

    >>> from autoprune import settings
    >>> settings.Settings.from_env({"AUTOPRUNE_LATENCY_MAX_ERROR": "0.1"}).latency_max_error
    0.1
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoprune.errors import AutopruneError


class Settings(BaseModel):
    """Process-wide settings (environment variable in brackets)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    progress: bool | None = Field(None, description="[AUTOPRUNE_PROGRESS] 1: progress bars always, 0: never; unset: on a terminal")
    cache: Path | None = Field(None, description="[AUTOPRUNE_CACHE] where generated datasets are cached (default: the system temp dir)")
    latency_predictor: Literal["table", "measure"] = Field("table", description="[AUTOPRUNE_LATENCY_PREDICTOR] latency budgets: predict plans with the lookup table, or measure every plan")
    latency_max_error: float = Field(0.05, gt=0, description="[AUTOPRUNE_LATENCY_MAX_ERROR] a table with a larger median error is not trusted (every plan measured)")
    token: str | None = Field(None, description="[AUTOPRUNE_TOKEN] the service's bearer token (default: generated, written 0600 in the runs dir)")
    allowed_factories: str = Field("", description="[AUTOPRUNE_ALLOWED_FACTORIES] service: packages whose factories specs may name, comma-separated (as serve --allow)")
    max_body: int | None = Field(None, gt=0, description="[AUTOPRUNE_MAX_BODY] service: the largest request body in bytes")
    service_storage: str | None = Field(None, description="[AUTOPRUNE_SERVICE_STORAGE] service: an Optuna storage URL for every search it runs")
    agent_token: str | None = Field(None, description="[AUTOPRUNE_AGENT_TOKEN] the device agent's token (agent and client)")
    agent_token_file: Path | None = Field(None, description="[AUTOPRUNE_AGENT_TOKEN_FILE] where the agent keeps its token (default ~/.autoprune/agent.token)")
    agent_allow: str = Field("", description="[AUTOPRUNE_AGENT_ALLOW] agent: modules whose factories it rebuilds besides the zoo, comma-separated")
    agent_device: str | None = Field(None, description="[AUTOPRUNE_AGENT_DEVICE] agent: cpu, cuda or cuda:N (default: cuda when present)")
    agent_max_bytes: int | None = Field(None, gt=0, description="[AUTOPRUNE_AGENT_MAX_BYTES] agent: the largest request body in bytes")

    @staticmethod
    def env_name(field: str) -> str:
        return "AUTOPRUNE_" + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        values = {f: env[cls.env_name(f)] for f in cls.model_fields if env.get(cls.env_name(f), "").strip()}
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            name = cls.env_name(str(err["loc"][0]))
            raise AutopruneError(f"{name}={env.get(name)!r}: {err['msg']}") from None


_current: list[Settings] = []


def configure(settings: Settings | None = None) -> Settings:
    """Read the environment (or take `settings`) once, at a front door; what `get()` returns from then on."""
    _current[:] = [settings or Settings.from_env()]
    return _current[0]


def get() -> Settings:
    """The settings in force (read from the environment on first use when no front door configured them)."""
    return _current[0] if _current else configure()
