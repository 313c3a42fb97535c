"""Errors and skip accounting for bad input data.

Every problem with user data is reported as a one-line :class:`DataError` naming the file or value and the fix.
In lenient mode the same problems are counted in a :class:`SkipReport` instead of raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("sidnet.data")

# Reasons used by the readers; kept as plain strings so reports print and serialise without ceremony.
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
SIZE_MISMATCH = "size_mismatch"
BOX_OUTSIDE_IMAGE = "box_outside_image"
EMPTY_BOX = "empty_box"
UNKNOWN_CLASS = "unknown_class"
MALFORMED_LABEL = "malformed_label"
DEGENERATE_MASK = "degenerate_mask"  # a polygon/RLE with no area (< 3 points, collinear, empty)
MASK_OUTSIDE_IMAGE = "mask_outside_image"
DUPLICATE_ID = "duplicate_image_id"
TOO_LARGE = "image_too_large"
ORPHAN_LABEL = "orphan_label"  # a label file without an image: not an error, only counted

LENIENT_HINT = "pass data.lenient=true to skip it"


class DataError(ValueError):
    """Bad input data. The message is a single line: what is wrong, where, and how to fix it."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught DataError") and "DataError: " in message:
            # A DataLoader worker re-raises as DataError(<"Caught ... Original Traceback ...">); keep the last line,
            # the original one-line message, instead of a traceback flattened into one unreadable line.
            message = message.rsplit("DataError: ", 1)[1]
        # Newlines would break the one-line contract (log greps, Hydra error summaries); flatten defensively.
        super().__init__(" ".join(message.split()))


@dataclass
class SkipReport:
    """What a reader skipped, per reason, with a few example messages.

    ``counts`` maps reason -> number of skipped items (a box, an image, or a label file for ``orphan_label``);
    ``examples`` keeps the first ``max_examples`` messages per reason.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, message: str) -> None:
        """Count one skipped item; warn on the first of each reason only, so a bad dataset cannot flood the log."""
        first = reason not in self.counts
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(message)
        if first:
            log.warning("%s (further '%s' skips are counted, not logged)", message, reason)

    def merge(self, other: SkipReport) -> SkipReport:
        """Add ``other``'s counts and examples into this report (in place) and return it."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(shown))])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "nothing skipped"
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total}: {parts}"
