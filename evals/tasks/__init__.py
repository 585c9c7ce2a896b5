"""lm-eval task configs over the locally extracted benchmarks and the synthetic recall probes.

Point lm-eval at this folder with `--include_path` (see `TASKS_DIR`).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
