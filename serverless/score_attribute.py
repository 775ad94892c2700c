"""The detection score as a CVAT attribute: the one way a score survives in CVAT.

CVAT drops the ``confidence`` a function returns. It stores an attribute a function returns only
when the function's spec declares that attribute on the label (with ``input_type`` and ``values``)
and the task's label has an attribute of the same name; the value is then checked against the
TASK's attribute: text is stored as sent, number takes integer strings only (``"0.87"`` is silently
dropped). The function cannot see the task, so the format is chosen when packaging:

- ``decimal`` (default): ``"0.873"``, declared as a text attribute; for a task attribute of type text.
- ``percent``: ``"87"``, declared as a number attribute 0..100 step 1; for a task attribute of type
  number with min 0, max 100, step 1 (fractional min/max/step make every CVAT call fail).

A task label without the attribute simply gets its shapes. Settings of the Nuclio function
(``spec.env``): ``CVAT_DETECTOR_SCORE_ATTRIBUTE`` (the name; unset: no attribute) and
``CVAT_DETECTOR_SCORE_FORMAT`` (``decimal`` or ``percent``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

NAME_ENV = "CVAT_DETECTOR_SCORE_ATTRIBUTE"
FORMAT_ENV = "CVAT_DETECTOR_SCORE_FORMAT"
DEFAULT_NAME = "score"
FORMATS = ("decimal", "percent")
#: The number attribute a percent score fits: min, max, step (CVAT's "values" of a number).
PERCENT_VALUES = ("0", "100", "1")
#: CVAT's limit on attribute names (AttributeSpec.name, max_length=64).
MAX_NAME = 64


def score_text(score: float, fmt: str) -> str:
    """``score`` (0..1) as the attribute value: "0.873" (decimal) or "87" (percent)."""
    clipped = min(max(float(score), 0.0), 1.0)
    if fmt == "percent":
        return str(round(clipped * 100))
    return f"{clipped:.3f}"


def check_name(name: str) -> str:
    """An attribute name CVAT accepts and a filter can address; ValueError says what was expected."""
    if not name or name != name.strip() or len(name) > MAX_NAME or any(c in name for c in "\n\r\t"):
        raise ValueError(
            f"expected an attribute name of 1 to {MAX_NAME} characters without surrounding "
            f"spaces or line breaks, got {name!r}"
        )
    return name


@dataclass(frozen=True)
class ScoreAttribute:
    """Which attribute carries the score, and in which format."""

    name: str = DEFAULT_NAME
    fmt: str = "decimal"

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.fmt not in FORMATS:
            raise ValueError(f"expected a score format among {', '.join(FORMATS)}, got {self.fmt!r}")

    @property
    def input_type(self) -> str:
        return "number" if self.fmt == "percent" else "text"

    @property
    def values(self) -> list[str]:
        """The spec's ``values``: min, max, step of a number; none for text (any string)."""
        return list(PERCENT_VALUES) if self.fmt == "percent" else []

    def spec(self) -> dict[str, Any]:
        """The attribute as a function spec declares it on a label (CVAT needs all three keys)."""
        return {"name": self.name, "input_type": self.input_type, "values": self.values}

    def value(self, score: float) -> dict[str, str]:
        """One entry of a returned shape's ``attributes``."""
        return {"name": self.name, "value": score_text(score, self.fmt)}

    def env(self) -> list[dict[str, str]]:
        """The function.yaml ``spec.env`` entries that switch the score on in the function."""
        return [{"name": NAME_ENV, "value": self.name}, {"name": FORMAT_ENV, "value": self.fmt}]

    @classmethod
    def from_env(cls) -> ScoreAttribute | None:
        """The function's setting; None when no attribute name is set. A bad value is a
        ValueError naming the variable (raised in init_context, so the deploy fails visibly)."""
        name = os.environ.get(NAME_ENV, "")
        if not name:
            return None
        fmt = os.environ.get(FORMAT_ENV) or "decimal"
        try:
            return cls(name, fmt)
        except ValueError as exc:
            raise ValueError(f"environment variables {NAME_ENV}/{FORMAT_ENV}: {exc}") from None


#: What ``python -m trainer package`` declares unless told otherwise.
DEFAULT_SCORE = ScoreAttribute()
