"""One rank of ``megatron-rcm train`` (launched by ``_launch_ranks.py``): argv = train arguments + OUT_DIR."""
import json
import os
import sys
import traceback

from megatron_rcm.cli import main

out = sys.argv[-1]
errors = []
try:
    rc = main(["train", *sys.argv[1:-1]])
    if rc:
        errors.append(f"megatron-rcm train exited {rc}")
except Exception:
    errors.append(traceback.format_exc())
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(errors, f)
