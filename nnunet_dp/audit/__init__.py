"""One-run privacy audit (Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023).

Core layer: torch/numpy/scipy/opacus only, never nnunetv2.
- estimator: the lower bound on epsilon from r guesses with v correct, and the best over guess counts (Bonferroni).
- canaries: white-box Dirac gradient canaries through the training step itself (DPRun.private_step), each of the norm
  whose scaled norm under the run's rule reaches the sensitivity (canary_norm), and a complete audit run that reports
  the lower bound next to the accountant's epsilon.
- mia: membership-inference metrics (ROC curve, AUC, TPR at low FPR, the calibrated threshold attack, Dice).
"""
from nnunet_dp.audit.canaries import DiracCanaries, canary_norm, canary_scores, make_canaries, run_one_run_audit
from nnunet_dp.audit.estimator import audit_from_scores, default_candidates, epsilon_lower_bound, p_value

__all__ = ["DiracCanaries", "audit_from_scores", "canary_norm", "canary_scores", "default_candidates",
           "epsilon_lower_bound", "make_canaries", "p_value", "run_one_run_audit"]
