"""`python -m bench.multitask task=A,B[,C] [method=lora] [overrides ...]` (bench/orchestration/multitask.py)."""
from bench.orchestration.multitask import main

if __name__ == "__main__":
    raise SystemExit(main())
