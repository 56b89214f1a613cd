"""Optuna sweeps of run settings (rank, alpha, learning rate, each method's knobs): `python -m bench.sweep`.

spec.py    sweep files (sweeps/*.yaml): schema, checks, Optuna distributions / sampler / pruner
study.py   shared storage, the lock, stale-trial recovery, workers, one trial = one bench.orchestration.worker.run
report.py  best command line, trials table, importances, objective plot; the parent MLflow run's record
cli.py     the command
"""
