"""`python -m bench.compare method=a,b,c [overrides] --trials N --seeds S` (bench/sweep/compare.py): every method tuned
on the same budget, each winner re-run over seeds next to its defaults, and the report."""
from bench.sweep.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
