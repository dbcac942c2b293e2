"""`megatron-rcm --help` and config errors answer without importing torch (which alone takes ~1 s)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from megatron_rcm.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)}))
"""


def _probe(*argv, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=60)
    return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["convert", "--help"], ["sample", "--help"],
                                  ["launch", "--help"]])
def test_help_imports_no_torch(argv):
    out, _ = _probe(*argv)
    assert out == {"rc": 0, "heavy": []}


@pytest.mark.parametrize("override,key", [
    ("model.nope=1", "model.nope"),
    ("eval.student_steps=[0,2]", "eval.student_steps"),
    ("eval.student_steps=[]", "eval.student_steps"),
    ("eval.student_steps=[2,2]", "eval.student_steps"),
    ("eval.teacher_steps=0", "eval.teacher_steps"),
    ("eval.num_videos=0", "eval.num_videos"),
    ("eval.cfg_scale=-1", "eval.cfg_scale"),
    ("eval.seed=-3", "eval.seed"),
    ("data.height=7", "data.height/width"),
    ("causal.chunk_frames=3", "causal.chunk_frames"),
    ("phases.1.teacher_from=nope", "phases.1.teacher_from"),
])
def test_config_errors_import_no_torch(override, key):
    out, err = _probe("train", "examples/tiny_recipe.yaml", override)
    assert out == {"rc": 2, "heavy": []}, err
    assert f"'{key}'" in err and err.count("\n") == 1
