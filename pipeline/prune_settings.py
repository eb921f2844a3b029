"""What ``onnxpipe prune`` is asked for: the method, its ratio and the settings it reads."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from onnxpipe.errors import InputError
from onnxpipe.option_scope import read_settings, refuse_unread

Method = Literal["magnitude", "channels", "lowrank"]


class PruneSettings(BaseModel):
    """What ``onnxpipe prune`` was asked for; recorded as the step's config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(description="magnitude, channels or lowrank")
    ratio: float = Field(description="share to remove, in (0, 1)")
    scope: Literal["global", "layer"] = Field("layer", description="magnitude: threshold scope")
    energy: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="lowrank: keep at least this share of energy (ratio's rank, or larger)",
    )
    gates: tuple[str, ...] = Field((), description="accuracy gates; with them, a search")
    cleanup: bool = Field(True, description="run the cleanup pass (no ORT level) first")
    multiple_of: int | None = Field(
        None, ge=1, description="channels: kept counts round up to it (None: the NCHWc block)"
    )

    @model_validator(mode="after")
    def _check(self) -> PruneSettings:
        # an option the method would ignore is refused: it read in the manifest as applied
        refuse_unread(self.model_fields_set, _APPLIES, self.method, "--method")
        if self.energy is not None and self.gates:
            raise ValueError(
                "--energy applies without --gate only: the gated search picks each layer's "
                "rank by the gate"
            )
        return self

    @model_serializer(mode="wrap")
    def _applied(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The settings the method uses: what the manifest records as applied."""
        return read_settings(handler(self), _APPLIES, self.method)


_APPLIES = {"scope": ("magnitude",), "energy": ("lowrank",), "multiple_of": ("channels",)}
"""The settings only one method reads."""


def check_ratio(ratio: float, flag: str = "--ratio") -> float:
    """``ratio`` itself, or InputError naming it ``flag`` when it is outside (0, 1)."""
    if not 0.0 < ratio < 1.0 or math.isnan(ratio):
        raise InputError(
            f"{flag} {ratio}: must lie strictly between 0 and 1 (the share of weights, "
            f"channels or parameters to remove), e.g. {flag} 0.3."
        )
    return ratio
