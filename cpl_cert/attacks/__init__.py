"""l2 attacks (PGD, APGD-CE, APGD-T, FMN minimum-norm, an AutoAttack-style ensemble) and the certificate check."""

from .apgd import apgd_l2, apgd_targeted_l2, checkpoints
from .common import AttackOutcome, project
from .ensemble import SuiteResult, Violation, find_violations, run_suite, verify, violations_at
from .minnorm import fmn_l2
from .options import ATTACKS, ENGINES, check_attack_options
from .pgd import pgd_l2

__all__ = [
    "ATTACKS", "ENGINES", "AttackOutcome", "SuiteResult", "Violation", "apgd_l2", "apgd_targeted_l2", "check_attack_options",
    "checkpoints", "find_violations", "fmn_l2", "pgd_l2", "project", "run_suite", "verify", "violations_at",
]
