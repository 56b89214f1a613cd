"""`python -m bench.sweep SWEEP.yaml [--trials N] [--workers N] [overrides ...]` (bench/sweep/cli.py)."""
from bench.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
