"""The decode settings: how an image file becomes the uint8 array the model sees, declared once.

`DecodeSettings` is the config's `data` section's decoding part (`DataConfig` derives from it,
so the YAML keys stay `data.image_size`, `data.resize`, ...), what the one decoder
(`decode.py`) and its worker processes take, and what `best_model.pt` keeps for predict
(`savedmodel.Preprocessing` derives from it). A new decode setting is a field here. No torch:
decode workers unpickle it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Square side in pixels that images are resized to. A type of its own so that a saved model's
# preprocessing is held to the very same bounds as the config.
MIN_IMAGE_SIZE = 8  # also the architecture table's smallest `min_size`
ImageSize = Annotated[int, Field(ge=MIN_IMAGE_SIZE, le=1024)]
Intensity = Literal["minmax", "percentile", "window"]
ResizeMode = Literal["stretch", "pad", "center_crop"]
RESIZE_MODES: tuple[str, ...] = ResizeMode.__args__  # type: ignore[attr-defined]


class DecodeSettings(BaseModel):
    """How a file becomes model input; saved with the model so that predict decodes alike.

    `intensity` applies to 16-bit, float and DICOM pixels (8-bit images are used as stored):
    `minmax` or `percentile` per image, or `window` = (center, width). A DICOM file's own
    VOI LUT or window is applied unless `intensity` is `window` (then `window` wins).
    The field order is the cache key's (`key`): append new fields at the end.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    # What messages call the fields: "data." in the config, "preprocessing." in a model file.
    field_prefix: ClassVar[str] = ""

    image_size: ImageSize = Field(224, description="square side in pixels images are resized to")
    intensity: Intensity = Field(
        "percentile",
        description="16-bit, float and DICOM pixels -> 8 bit: per-image min-max, per-image "
        "percentiles (data.percentiles), or data.window; a DICOM file's own window is used "
        "unless this is 'window'",
    )
    window: tuple[float, Annotated[float, Field(gt=0)]] | None = Field(
        None, description="intensity=window: [center, width] in the pixel (DICOM: modality) units"
    )
    percentiles: tuple[
        Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]
    ] = Field((0.5, 99.5), description="intensity=percentile: the low and high percentile")
    resize: ResizeMode = Field(
        "stretch",
        description="to image_size square: stretch, or keep the aspect ratio by padding with "
        "black (pad) or by cutting the long side (center_crop)",
    )
    max_pixels: int = Field(
        100_000_000,
        ge=1,
        le=2**31,
        description="larger images are decoded reduced (JPEG) or reported unreadable by name",
    )

    @model_validator(mode="after")
    def _consistent_decoding(self) -> DecodeSettings:
        p = self.field_prefix
        if self.intensity == "window" and self.window is None:
            raise ValueError(f"intensity=window needs {p}window: [center, width]")
        if self.window is not None and self.intensity != "window":
            raise ValueError(f"{p}window is set but {p}intensity is not 'window'")
        if not self.percentiles[0] < self.percentiles[1]:
            raise ValueError(f"{p}percentiles: the low one must be below the high one")
        return self

    def decode_settings(self) -> DecodeSettings:
        """Just the decode settings of a config section or a saved model's preprocessing: what
        the decoder and its worker processes take (a `DataConfig` would pull torch into them)."""
        return DecodeSettings(**{name: getattr(self, name) for name in DecodeSettings.model_fields})

    def key(self) -> str:
        """What distinguishes one decoded cache from another: every setting, in field order
        (`size|intensity|window|percentiles|resize|max_pixels`, as before this type existed)."""
        return "|".join(str(getattr(self, name)) for name in DecodeSettings.model_fields)
