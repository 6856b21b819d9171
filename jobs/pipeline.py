"""Ray job: every stage in data-flow order (pretrain, select, embed, adapt, index, heads, evaluate).

    python jobs/pipeline.py --workdir s3://bucket/run [--stages embed,index,evaluate] \
        [key.sub=value ...] [STAGE:key.sub=value ...]

Each stage reads configs/<stage>.yaml when it exists; plain overrides apply to every
stage, `embed:ray.num_workers=8` to one. Prints each stage's result as JSON.
"""

import sys

# jobs/select.py would shadow the standard library's `select` (socket and asyncio import it):
# take this script's directory off the import path before anything else is imported.
if not sys.flags.safe_path:
    del sys.path[0]

from medray.jobs_entry import pipeline_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(pipeline_main())
