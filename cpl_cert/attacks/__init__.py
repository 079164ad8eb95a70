"""l2 attacks (PGD, APGD-CE, APGD-T, FMN minimum-norm, an AutoAttack-style ensemble) and the certificate check."""

from .apgd import apgd_l2, apgd_targeted_l2, checkpoints
from .check import Violation, find_violations, make_checker, verify_any, verify_exact, verify_float32, violations_at
from .common import AttackOutcome, project
from .ensemble import SuiteResult, run_suite
from .minnorm import fmn_l2
from .options import ATTACKS, ENGINES, check_attack_options
from .pgd import pgd_l2

__all__ = [
    "ATTACKS", "ENGINES", "AttackOutcome", "SuiteResult", "Violation", "apgd_l2", "apgd_targeted_l2", "check_attack_options",
    "checkpoints", "find_violations", "fmn_l2", "make_checker", "pgd_l2", "project", "run_suite", "verify_any",
    "verify_exact", "verify_float32", "violations_at",
]
