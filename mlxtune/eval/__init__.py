"""Did the finetune help? `evaluate_run` scores base vs tuned with bootstrap intervals and writes eval.json and a
self-contained report.html; `print_summary` says the answer in a terminal."""

from mlxtune.eval.evaluate import EvalResult, evaluate_run
from mlxtune.eval.summary import print_summary

__all__ = ["EvalResult", "evaluate_run", "print_summary"]
