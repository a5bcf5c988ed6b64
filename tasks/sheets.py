"""Contact sheets: images as captioned tiles in one PNG, for people to look at (the
augmentation preview, a report's galleries of failures, label doubts)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

#: Smallest side of a tile, in pixels: small images are scaled up by a whole factor.
MIN_TILE = 96
#: Height of the caption strip under each tile.
CAPTION = 14
_GAP = 2


def contact_sheet(images: np.ndarray, captions: list[str]) -> tuple[Image.Image, int, int]:
    """Tiles in a near-square grid, each scaled up by a whole factor with a caption under
    it; the sheet, its columns and the tile's side."""
    count, height, width = images.shape[:3]
    factor = max(1, math.ceil(MIN_TILE / max(height, width)))
    tile_w, tile_h = width * factor, height * factor
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    cell_w, cell_h = tile_w + _GAP, tile_h + CAPTION + _GAP
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        tile = Image.fromarray(image).resize((tile_w, tile_h), Image.Resampling.NEAREST)
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + tile_h + 1), caption[: max(1, tile_w // 6)], fill="black")
    return sheet, columns, tile_w
