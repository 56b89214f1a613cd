"""What is measured: tasks, models, methods, the training loop, the metric registry and measurements.

Imports nothing from orchestration, tracking or the report (tests/test_layout.py holds that).
"""
