"""Entry point of a reward worker process: ``python -m jrft.rewards._worker_main READ_FD WRITE_FD``.

Kept apart from :mod:`jrft.rewards.workers` so running it with ``-m`` does not re-execute a module the package
has already imported.
"""

import sys

from jrft.rewards.workers import worker_main

if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
