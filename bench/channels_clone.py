"""Alias kept for old commands: the response-cloning rows of the channel ablation now live in
``bench/channels.py`` (one setup, several sampled answers per prompt for every row). This runs its rows
``kd,kd+clone``; every other argument goes through unchanged.

    .venv/bin/python bench/channels_clone.py --steps 12 --threads 1     # == channels.py --rows kd,kd+clone ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    script = str(Path(__file__).with_name("channels.py"))
    args = [a for a in sys.argv[1:]]
    if not any(a == "--rows" or a.startswith("--rows=") for a in args):
        args = ["--rows", "kd,kd+clone", *args]
    os.execv(sys.executable, [sys.executable, script, *args])
