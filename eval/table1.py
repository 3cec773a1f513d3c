#!/usr/bin/env python
"""Produce the paper's Table 1 for a base SD3 pipeline, trained LoRA runs and other pipelines.

    python eval/table1.py --base assets/tinyworld/sd3 --run ADRPO=runs/tiny/final \\
        --prompts prompts/tinyworld_heldout.txt --clip assets/tinyworld/clip --out results/table1

See ``--help`` and README.md ("Evaluation").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd3_adrpo.table1 import main  # noqa: E402

if __name__ == "__main__":
    main()
