"""When a model's logits are lm_head(h) alone, the one condition the corpus's exact KL shortcut
(and its per-token reference) relies on. Read from config.json without torch, so that the
launcher refuses --eval-corpus for such a model before a run directory exists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Config keys that put something between lm_head(h) and the logits (Gemma 2's tanh softcap,
# Cohere's and Granite's scales); 1 and None leave them plain.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def logits_transform(config: Mapping[str, Any] | Any) -> str | None:
    """`key=value` of the first transform the config applies to lm_head's output, else None."""
    for key in LOGIT_TRANSFORMS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return f"{key}={value}"
    return None
