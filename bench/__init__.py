"""peft-bench. Importing the package registers the `${arch:<role>}` config resolver (bench/architectures.py)."""
from bench import architectures  # noqa: F401
