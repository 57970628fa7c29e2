"""A minimal PNG writer (RGB, 8 bits, no dependency) and the two pictures the report saves: the coloured
grid (a head per cell) and a strip of grey frames (sampled clips, a row per model).

PNG = signature, IHDR (width, height, depth 8, colour type 2), IDAT (zlib of the rows, each led by
filter byte 0), IEND; every chunk is length, type, data, CRC-32 of type + data.
"""

from __future__ import annotations

import struct
import zlib

RGB = tuple[int, int, int]


def encode(pixels: list[list[RGB]]) -> bytes:
    """PNG bytes of `pixels` (rows of (r, g, b) in 0…255)."""
    height, width = len(pixels), len(pixels[0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def hex_rgb(colour: str) -> RGB:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def grid(cells: list[list[tuple[str, float]]], cell: int = 20, gap: int = 2) -> bytes:
    """One cell per (row, column): ``cells[r][c] = (colour "#rrggbb", fill in [0, 1])``. The bottom
    `fill` of a cell is drawn in its colour, the rest in a light tint of it (so a head's block density
    reads off the picture); missing cells are white."""
    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    width, height = gap + cols * (cell + gap), gap + rows * (cell + gap)
    white: RGB = (255, 255, 255)
    pixels = [[white] * width for _ in range(height)]
    for r, row in enumerate(cells):
        for c, (colour, fill) in enumerate(row):
            full = hex_rgb(colour)
            tint = tuple(round(255 - (255 - v) * 0.3) for v in full)
            edge = cell - round(cell * min(max(fill, 0.0), 1.0))  # rows above `edge` are tinted
            y0, x0 = gap + r * (cell + gap), gap + c * (cell + gap)
            for y in range(cell):
                pixels[y0 + y][x0:x0 + cell] = [full if y >= edge else tint] * cell
    return encode(pixels)


def frames(rows: list[list[list[list[int]]]], scale: int = 3, gap: int = 2) -> bytes:
    """A strip of grey frames: ``rows[r][t]`` is frame t of row r, an H × W list of grey levels 0…255;
    each pixel becomes a `scale` × `scale` square, frames and rows `gap` pixels apart on white."""
    height, width = len(rows[0][0]), len(rows[0][0][0])
    cols = max(len(r) for r in rows)
    white: RGB = (255, 255, 255)
    pixels = [[white] * (gap + cols * (width * scale + gap))
              for _ in range(gap + len(rows) * (height * scale + gap))]
    for r, row in enumerate(rows):
        for t, frame in enumerate(row):
            y0, x0 = gap + r * (height * scale + gap), gap + t * (width * scale + gap)
            for y, line in enumerate(frame):
                scaled = [(v, v, v) for v in line for _ in range(scale)]
                for dy in range(scale):
                    pixels[y0 + y * scale + dy][x0:x0 + width * scale] = scaled
    return encode(pixels)
