"""Version numbers that both ends check: a mismatch is refused, never guessed around."""

PROTOCOL_VERSION = 1
PLAN_FORMAT = 1
