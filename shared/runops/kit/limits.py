"""What a run's fields may hold: one set of rules for every service that checks them (the
control plane for task definitions, the run store that writes runs, and the mollifier and ingest,
which refuse first so a caller learns which item or field is wrong)."""

from __future__ import annotations

import re

# An id body (the part after "<prefix>_"): LEGACY and NEW bodies both fit.
ID_BODY = re.compile(r"[0-9a-z]{1,64}")
TASK_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
TASK_IDENTIFIER_TEXT = "1-128 of letters, digits and _ . : / - starting with a letter or digit"
IDEMPOTENCY_KEY_LIMIT = 512
# Queue names, concurrency keys, machine presets, versions and other short texts.
TEXT_LIMIT = 256
MAX_TAGS = 10
TAG_LIMIT = 128
MAX_ATTEMPTS = 100
