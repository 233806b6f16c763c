"""Run stage 03 in one process of a torchrun world and save what this rank ended with (for test_train_ddp.py).

Usage: torchrun --nproc_per_node=N tests/ddp_worker.py CONFIG RESULT_DIR [key=value ...]
"""

import json
import os
import sys
from pathlib import Path

from pneumoseg.config import load_config
from pneumoseg.stages import train

if __name__ == "__main__":
    config, result_dir, *overrides = sys.argv[1:]
    summary = train.run(load_config(config, overrides))
    Path(result_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(summary))
