"""The entry point of the service's workers: ``python -m autoprune.app.service run_worker STATE_DIR``."""

import sys

from autoprune.app.service.searches import run_worker

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run_worker":
        raise SystemExit(run_worker(sys.argv[2]))
    print("usage: autoprune serve --help (this module's entry point is for the service's workers)", file=sys.stderr)
    raise SystemExit(2)
