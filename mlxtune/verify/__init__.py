"""Round-trip fidelity: every place a tuned model is handed to renders, stops and answers like base + adapter."""

from mlxtune.verify.report import print_verify
from mlxtune.verify.run import (HOPS, VERIFIED_FORMATS, HopResult, VerifyResult, verify_by_default, verify_export,
                                verify_run)

__all__ = ["HOPS", "VERIFIED_FORMATS", "HopResult", "VerifyResult", "print_verify", "verify_by_default",
           "verify_export", "verify_run"]
