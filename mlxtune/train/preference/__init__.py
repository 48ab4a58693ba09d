"""Preference training: DPO and ORPO objectives (objective.py) and the run that trains with them (run.py)."""
