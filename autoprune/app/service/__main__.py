"""The entry point of the service's workers: ``python -m autoprune.app.service _worker STATE_DIR``."""

import sys

from autoprune.app.service.searches import _worker

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_worker":
        raise SystemExit(_worker(sys.argv[2]))
    print("usage: autoprune serve --help (this module's entry point is for the service's workers)", file=sys.stderr)
    raise SystemExit(2)
