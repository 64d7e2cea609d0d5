"""lm-eval task definitions that ship with lowbit and need no download (see ``lowbit_tasks.py``)."""
