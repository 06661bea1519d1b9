"""The search service: launch and watch searches over HTTP (FastAPI + uvicorn).

    autoprune serve [--host 127.0.0.1] [--port 8765] [--runs runs] [--token-file FILE]

Endpoints (every one, the OpenAPI schema included, needs ``Authorization: Bearer <token>``):

- ``POST /searches``: a spec as YAML or JSON -> ``{"id": ...}``; validated before any work starts (422 with the
  spec's validation message otherwise), then run by a worker process (``python -m autoprune.app.service _worker``,
  i.e. the ``autoprune search`` path; the ray backend runs there too).
- ``GET /searches``: every search with status, progress (completed/total trials) and best value so far.
- ``GET /searches/{id}``: the same plus ``result`` (the run's result.json) when done.
- ``GET /searches/{id}/pareto`` (JSON) and ``/searches/{id}/pareto.html`` (plotly figure).
- ``DELETE /searches/{id}``: cancels a running search (its process group gets SIGTERM, then SIGKILL).

State lives only in the run directories and the study storage: ``RUNS/.service/<id>/`` holds the submitted
spec, the worker's pid, its log and exit status, and progress is read from the Optuna storage. A restarted
service therefore lists running and finished searches again, and workers outlive it; a search whose worker
died with the service (a crash, a reboot: no exit status, or interrupted by a SIGTERM the service did not
send) is restarted when the service starts again, and resumes from its storage (finished trials are kept).

Security: loopback by default; a bearer token from ``AUTOPRUNE_TOKEN`` or a token file (created 0600, refused
when others can read it), compared in constant time and never logged or passed to workers; a spec's
``output``, checkpoint and journal storage must stay inside the runs directory and SQL storage must be the
service's own and a Ray cluster only the local one; every factory a spec names (model, data, task,
evaluation.metric) must come from autoprune's factory modules or a package the operator allows at start
(``--allow mypkg`` / ``AUTOPRUNE_ALLOWED_FACTORIES=mypkg``), never the standard library, with plain JSON
kwargs, checked on the text before anything is imported and again where the worker imports it (see
`autoprune.model.factories`); request bodies are limited (``AUTOPRUNE_MAX_BODY``, default 1 MiB); specs are parsed with
``yaml.safe_load``/JSON and nothing is ever unpickled.
"""

from autoprune.app.service.admission import ServiceConfig, Refused, admit_spec, load_token
from autoprune.app.service.server import create_app, serve

__all__ = ["ServiceConfig", "Refused", "admit_spec", "load_token", "create_app", "serve"]
