"""train.py's parts, one job each: startup.py starts a run, run.py holds it and its step's
bookkeeping, evaluation.py evaluates and reports, saving.py keeps weights and checkpoints,
journal.py says and records. Only train.py imports them."""
