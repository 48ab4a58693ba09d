"""Round-trip fidelity: every place a tuned model is handed to renders, stops and answers like base + adapter."""

from mlxtune.verify.report import print_verify
from mlxtune.verify.run import HOPS, HopResult, VerifyResult, verify_run

__all__ = ["HOPS", "HopResult", "VerifyResult", "print_verify", "verify_run"]
