"""Image grids with captions (prompts and scores), saved as PNG."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from opdkit.rundir import atomic_path


def save_grid(
    images: np.ndarray,
    captions: list[str],
    path: str | Path,
    cols: int = 8,
    cell: int = 128,
    caption_lines: int = 4,
) -> Path:
    """Save ``images`` (N, H, W, 3) uint8 as a captioned grid PNG, atomically.

    Each image is upscaled (nearest neighbour, so pixels stay visible) to ``cell`` x ``cell`` and
    gets up to ``caption_lines`` lines of its caption underneath.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    if n == 0:
        raise ValueError("save_grid: no images")
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    font: Any = ImageFont.load_default()
    line_h = 11
    chars = max(8, cell // 6)
    text_h = caption_lines * line_h + 4
    sheet = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = 4 + c * (cell + 4), 4 + r * (cell + text_h + 4)
        tile = Image.fromarray(np.asarray(images[i], dtype=np.uint8)).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (x0, y0))
        lines: list[str] = []
        for part in captions[i].split("\n"):
            lines.extend(textwrap.wrap(part, chars) or [""])
        for j, line in enumerate(lines[:caption_lines]):
            draw.text((x0, y0 + cell + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
