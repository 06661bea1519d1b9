"""Deprecated: `autoprune.api` moved to `autoprune.app.api` (and the one-screen API is `import autoprune`).

It keeps working for one release, with a DeprecationWarning."""

import warnings

from autoprune.app.api import *  # noqa: F401,F403
from autoprune.app.api import export, load, plan_of, result_path, search, session, summarize  # noqa: F401

warnings.warn("autoprune.api is deprecated: use `import autoprune` (autoprune.search/load/export) or "
              "autoprune.app.api", DeprecationWarning, stacklevel=2)
