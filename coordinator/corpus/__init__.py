"""The evaluation corpus (--eval-corpus): its documents (documents), lm-eval's scoring and the
KL shortcut (scoring), what the scores add up to (stats), and its place in a run (in_run)."""
