"""Optuna sweeps of run settings (rank, alpha, learning rate, each method's knobs): `python -m bench.sweep`.

spec.py     sweep files (sweeps/*.yaml): schema, checks, Optuna distributions / sampler / pruner
storage.py  shared storage, the lock, stale-trial recovery
study.py    workers, one trial = one bench.orchestration.worker.run_job, the progress line
cli.py      the command; its end-of-study outputs (reports/<study>/, the parent MLflow run's record) come from
            the analysis layer: bench/report/sweep_outputs.py, on bench/report/sweeps.py's summary and
            bench/report/plots.py's objective plot
"""
