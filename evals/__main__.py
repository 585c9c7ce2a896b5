"""lm-eval's own CLI with the `hyla` model type registered and the local task folder included.

    python -m hyla.evals run --model hyla --model_args pretrained=smollm2-135m --tasks hellaswag --limit 100
"""

import sys

from lm_eval.__main__ import cli_evaluate

import hyla.evals.lm_eval_model  # noqa: F401  (registers --model hyla)
from hyla.evals.cli import quiet_git_hash
from hyla.evals.tasks import TASKS_DIR

if __name__ == "__main__":
    if "--include_path" not in sys.argv and len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.argv += ["--include_path", str(TASKS_DIR)]
    with quiet_git_hash():
        cli_evaluate()
