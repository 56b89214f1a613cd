"""What keeps runs alive: validation, the job (resume, skip, worker process), the worker, faults, locks."""
