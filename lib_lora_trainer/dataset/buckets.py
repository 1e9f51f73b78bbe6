"""Aspect-ratio buckets, computed the way kohya's sd-scripts does, so a dataset lands in the same buckets.

Facts (sd-scripts ``model_util.make_bucket_resolutions`` and ``BucketManager.select_bucket``): buckets
are multiples of 64 between the minimum and maximum side with an area of at most resolution²; an image
takes the bucket whose aspect ratio is nearest to its own, is scaled to cover it and centre-cropped.
With "no upscale", an image is only shrunk (to at most resolution² pixels) and its bucket is its own
size floored to multiples of 64. Without buckets every image goes to resolution x resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUCKET_STEP = 64


@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]  # (width, height) the image is cropped to
    resized: tuple[int, int]  # the size the image is scaled to first (covers the bucket)
    ar_error: float  # bucket aspect ratio minus image aspect ratio


def make_bucket_resolutions(
    resolution: int, min_size: int = 256, max_size: int = 1024, step: int = BUCKET_STEP
) -> list[tuple[int, int]]:
    """Every predefined (width, height) bucket for ``resolution``, sorted."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // step) * step
    resolutions = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += step
    return sorted(resolutions)


class Bucketer:
    """Chooses a bucket for an image size; one instance per training configuration."""

    def __init__(
        self,
        resolution: int,
        *,
        enabled: bool = True,
        min_size: int = 256,
        max_size: int = 1024,
        no_upscale: bool = False,
        step: int = BUCKET_STEP,
    ):
        self.resolution = resolution
        self.enabled = enabled
        self.no_upscale = enabled and no_upscale
        self.step = step
        if not enabled:
            self.predefined = [(resolution, resolution)]
        else:
            self.predefined = make_bucket_resolutions(resolution, min_size, max_size, step)
        self._predefined_set = set(self.predefined)

    def select(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if self.no_upscale:
            resized = self._shrunk_size(width, height)
            bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        else:
            bucket = self._nearest_predefined(width, height)
            bucket_aspect = bucket[0] / bucket[1]
            scale = bucket[1] / height if aspect > bucket_aspect else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return BucketChoice(bucket, resized, bucket[0] / bucket[1] - aspect)

    def _nearest_predefined(self, width: int, height: int) -> tuple[int, int]:
        if (width, height) in self._predefined_set:
            return width, height
        aspect = width / height
        # min() keeps the first of equal errors, as numpy's argmin does in sd-scripts
        return min(self.predefined, key=lambda reso: abs(reso[0] / reso[1] - aspect))

    def _shrunk_size(self, width: int, height: int) -> tuple[int, int]:
        max_area = self.resolution * self.resolution
        if width * height <= max_area:
            return width, height
        aspect = width / height
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        # round one side to the step, derive the other; keep whichever distorts the aspect ratio less
        width_rounded = self._round(resized_width)
        height_for_width = self._round(width_rounded / aspect)
        height_rounded = self._round(resized_height)
        width_for_height = self._round(height_rounded * aspect)
        error_w = abs(width_rounded / height_for_width - aspect)
        error_h = abs(width_for_height / height_rounded - aspect)
        if error_w < error_h:
            return width_rounded, int(width_rounded / aspect + 0.5)
        return int(height_rounded * aspect + 0.5), height_rounded

    def _round(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.step


def bucket_info(
    choices_with_counts: list[tuple[BucketChoice, int]], *, enabled: bool = True
) -> dict[str, object] | None:
    """kohya's ``ss_bucket_info``: buckets sorted by resolution with counts (repeats included) and the
    mean absolute aspect-ratio error over distinct images. None without bucketing, as kohya writes."""
    if not enabled:
        return None
    counts: dict[tuple[int, int], int] = {}
    for choice, count in choices_with_counts:
        counts[choice.bucket] = counts.get(choice.bucket, 0) + count
    buckets = {
        str(index): {"resolution": list(reso), "count": counts[reso]}
        for index, reso in enumerate(sorted(reso for reso, count in counts.items() if count > 0))
    }
    errors = [abs(choice.ar_error) for choice, _ in choices_with_counts]
    mean_error = sum(errors) / len(errors) if errors else 0.0
    return {"buckets": buckets, "mean_img_ar_error": mean_error}
