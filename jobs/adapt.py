"""Ray job: retrieval adapters on the embeddings, the best on validation kept.

    python jobs/adapt.py -c configs/embed.yaml [key.sub=value ...]
    medray submit adapt -c configs/adapt.yaml --address http://HEAD:8265 [--follow]

Joins the cluster it runs in (ray.address: auto) or starts a local Ray; prints the
stage's result as JSON. Exit code: 0 done, 2 bad config or input, 1 failure.
"""

import sys

# jobs/select.py would shadow the standard library's `select` (socket and asyncio import it):
# take this script's directory off the import path before anything else is imported.
if not sys.flags.safe_path:
    del sys.path[0]

from medray.jobs_entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("adapt"))
