"""Start-up time of the `hf-ext` command line: the light commands against importing torch alone.

    python benchmarks/cli_startup.py [--repeats 7]

Each command runs as a fresh process (what a user waits for), one after the other in interleaved rounds, so
drift falls on all of them alike; the figures are medians. `hf-ext --help` and `hf-ext zoo list` import
neither torch nor transformers (tests/test_cli.py checks that); a command that does real work pays for what
it imports when it runs. Run it with nothing else on the CPU.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import save_result  # noqa: E402

HF_EXT = shutil.which("hf-ext") or str(Path(sys.executable).parent / "hf-ext")
COMMANDS = {
    "hf-ext --help": [HF_EXT, "--help"],
    "hf-ext zoo list": [HF_EXT, "zoo", "list"],
    "hf-ext convert tinysr --help": [HF_EXT, "convert", "tinysr", "--help"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
    # what every command paid before the CLI imported lazily: `import hf_ext` imported hf_ext.mla and hf_ext.moe
    "python -c 'import hf_ext.mla, hf_ext.moe' (the old start-up)": [sys.executable, "-c", "import hf_ext.mla, hf_ext.moe"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_startup.json"))
    args = ap.parse_args()
    times = {name: [] for name in COMMANDS}
    stderr = {}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            times[name].append(time.perf_counter() - t0)
            stderr[name] = run.stderr.strip()
    rows = [{"command": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
             "stderr_lines": len(stderr[name].splitlines())} for name, t in times.items()]
    for r in rows:
        print(f"{r['command']:40} median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, max {r['max_s']:.3f}), "
              f"{r['stderr_lines']} stderr lines")
    note = (f"Wall time of a fresh process, median of {args.repeats} interleaved rounds; `hf-ext --help` and "
            "`hf-ext zoo list` import no torch (tests/test_cli.py), a command's own --help imports what its options "
            "need.")
    save_result(args.out, "CLI start-up", platform.processor() or platform.machine(),
                {"Start-up": {"note": note, "rows": rows}}, repeats=args.repeats)


if __name__ == "__main__":
    main()
