"""Run a Python snippet in a subprocess where `import hf_ext` fails.

This is how every technique proves that its saved checkpoint loads with `trust_remote_code=True` on a
machine without hf-ext: the snippet runs from an empty folder, with a meta-path finder (installed by a
`sitecustomize`) that refuses `hf_ext` and `conversion`, so neither the editable install nor the
checkout can leak in.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

_BLOCKER = """
import sys
class _NoHfExt:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('hf_ext', 'conversion'):
            raise ImportError(f'{name} is blocked: this process simulates a machine without hf-ext')
        return None
sys.meta_path.insert(0, _NoHfExt())
"""


def run_without_hf_ext(code: str, timeout: float = 300) -> dict:
    """Run ``code``; its last stdout line must be JSON, which is returned. Asserts `import hf_ext` fails."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "sitecustomize.py").write_text(_BLOCKER)
        prelude = "try:\n    import hf_ext\n    raise SystemExit('hf_ext is importable')\nexcept ImportError:\n    pass\n"
        env = {**os.environ, "PYTHONPATH": d, "HF_HUB_OFFLINE": "1"}
        r = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=d, env=env,
                           capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"snippet failed:\nSTDOUT:\n{r.stdout}\nSTDERR:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])
