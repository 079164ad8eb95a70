"""l2 attacks (PGD, APGD-CE, APGD-T, FMN minimum-norm, an AutoAttack-style ensemble) the certificate check, and
an attack run's headline numbers against the certificates (``attack_dataset``, ``summarize``)."""

from .apgd import apgd_l2, apgd_targeted_l2, checkpoints
from .audit import AttackSummary, accuracy_rows, attack_dataset, summarize, tightness
from .check import Violation, find_violations, make_checker, verify_any, verify_exact, verify_float32, violations_at
from .common import AttackOutcome, project
from .ensemble import SuiteResult, run_suite
from .minnorm import fmn_l2
from .options import ATTACKS, ENGINES, check_attack_options
from .pgd import pgd_l2

__all__ = [
    "ATTACKS", "ENGINES", "AttackOutcome", "AttackSummary", "SuiteResult", "Violation", "accuracy_rows", "apgd_l2",
    "attack_dataset", "apgd_targeted_l2", "check_attack_options",
    "checkpoints", "find_violations", "fmn_l2", "make_checker", "pgd_l2", "project", "run_suite", "summarize", "tightness", "verify_any",
    "verify_exact", "verify_float32", "violations_at",
]
