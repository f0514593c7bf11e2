"""Procedural product images with PIL: the category's shape, drawn in the product's colour with its
pattern and material texture, on a background, seen under a viewpoint and a lighting.

Everything an image shows follows from the product's attributes (what a model must learn to align
with the text) or from the view (what it must learn to ignore). ``render(attrs, view)`` is a pure
function of its arguments, so a catalog is deterministic for a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SIZE = 112  # pixels; 112 = 8 x 14-pixel patches, 16 image tokens after the 2x2 merge

COLOURS = {
    "red": (215, 35, 35), "orange": (245, 140, 25), "yellow": (240, 215, 40), "green": (45, 160, 65),
    "teal": (25, 150, 150), "blue": (45, 85, 220), "navy": (25, 35, 110), "purple": (130, 55, 170),
    "pink": (240, 125, 185), "brown": (125, 80, 40), "black": (28, 28, 28), "white": (250, 250, 250),
}
PATTERNS = ("solid", "striped", "dotted", "checked", "wavy")
MATERIALS = ("matte", "glossy", "metallic", "wooden")
SIZES = {"small": 0.55, "medium": 0.72, "large": 0.9}

# Unit polygons (x, y in [-1, 1], y down) per shape name.
def _regular(n: int, rot: float = -math.pi / 2, r: float = 1.0) -> list[tuple[float, float]]:
    return [(r * math.cos(rot + 2 * math.pi * k / n), r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(40):
        t = 2 * math.pi * k / 40
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17))
    return pts


SHAPES = {
    "circle": _regular(48),
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "ring": _regular(48),  # drawn with a hole
    "diamond": [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)],
    "triangle": [(0, -0.95), (0.95, 0.8), (-0.95, 0.8)],
    "star": _star(),
    "heart": _heart(),
    "ellipse": [(math.cos(2 * math.pi * k / 48), 0.55 * math.sin(2 * math.pi * k / 48)) for k in range(48)],
    "tall-rectangle": [(-0.6, -0.95), (0.6, -0.95), (0.6, 0.95), (-0.6, 0.95)],
    "hexagon": _regular(6, rot=0.0),
    "t-shape": [(-1, -0.8), (1, -0.8), (1, -0.25), (0.45, -0.25), (0.45, 0.95), (-0.45, 0.95),
                (-0.45, -0.25), (-1, -0.25)],
    "vase": [(-0.25, -0.95), (0.25, -0.95), (0.22, -0.55), (0.7, -0.1), (0.6, 0.7), (0.35, 0.95),
             (-0.35, 0.95), (-0.6, 0.7), (-0.7, -0.1), (-0.22, -0.55)],
}

BACKGROUNDS = {
    "studio": ((236, 236, 236), (236, 236, 236)),  # the standardised main view
    "warm": ((244, 228, 205), (214, 190, 160)),
    "cool": ((205, 222, 240), (160, 185, 215)),
    "grass": ((170, 205, 150), (110, 160, 100)),
    "dark": ((70, 70, 80), (40, 40, 45)),
    "sand": ((225, 210, 170), (200, 180, 140)),
}


@dataclass(frozen=True)
class View:
    """How a product is photographed: none of this is in the product's text."""

    background: str = "studio"
    angle: float = 0.0        # in-plane rotation, degrees
    turn: float = 1.0         # horizontal foreshortening (a viewpoint turned away), (0, 1]
    dx: float = 0.0           # offset of the centre, fraction of the image
    dy: float = 0.0
    light: float = 1.0        # brightness multiplier
    light_dir: float = 0.0    # direction of the light gradient, radians

    @staticmethod
    def main() -> View:
        return View()

    @staticmethod
    def random(rng: random.Random) -> View:
        return View(
            background=rng.choice([b for b in BACKGROUNDS if b != "studio"]),
            angle=rng.uniform(-30, 30), turn=rng.uniform(0.7, 1.0),
            dx=rng.uniform(-0.08, 0.08), dy=rng.uniform(-0.08, 0.08),
            light=rng.uniform(0.75, 1.2), light_dir=rng.uniform(0, 2 * math.pi),
        )


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    """Darker (f < 1) or lighter (f > 1, towards white) version of a colour."""
    if f <= 1:
        return tuple(int(v * f) for v in c)
    return tuple(int(v + (255 - v) * (f - 1)) for v in c)


def _contrast(c: tuple[int, int, int]) -> tuple[int, int, int]:
    """A pattern colour that stays visible on both dark and light base colours."""
    return _shade(c, 0.45) if sum(c) > 300 else _shade(c, 1.6)


_GRAD = Image.linear_gradient("L").resize((SIZE, SIZE))  # 0 at the top, 255 at the bottom
_SHADOW_LUT = [v // 3 for v in range(256)]
_METAL_LUT = [80 + v // 2 for v in range(256)]


def _texture(colour: tuple[int, int, int], pattern: str, material: str) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), colour)
    d = ImageDraw.Draw(img)
    pc = _contrast(colour)
    if pattern == "striped":
        for k in range(-SIZE, 2 * SIZE, 16):
            d.polygon([(k, 0), (k + 7, 0), (k + 7 - SIZE, SIZE), (k - SIZE, SIZE)], fill=pc)
    elif pattern == "dotted":
        for y in range(6, SIZE, 16):
            for x in range(6 + (8 if (y // 16) % 2 else 0), SIZE, 16):
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=pc)
    elif pattern == "checked":
        for y in range(0, SIZE, 14):
            for x in range(0, SIZE, 14):
                if (x // 14 + y // 14) % 2:
                    d.rectangle([x, y, x + 13, y + 13], fill=pc)
    elif pattern == "wavy":
        for y0 in range(4, SIZE, 14):
            pts = [(x, y0 + 4 * math.sin(x / 6.0)) for x in range(0, SIZE + 1, 3)]
            d.line(pts, fill=pc, width=3)
    if material == "metallic":
        band = _GRAD.rotate(90).point(_METAL_LUT)
        img = Image.composite(img, Image.new("RGB", img.size, _shade(colour, 1.5)), band)
    elif material == "wooden":
        d = ImageDraw.Draw(img)
        gc = _shade(colour, 0.6) if sum(colour) > 120 else _shade(colour, 1.4)
        for x0 in range(3, SIZE, 9):
            pts = [(x0 + 2.5 * math.sin(y / 9.0 + x0), y) for y in range(0, SIZE + 1, 4)]
            d.line(pts, fill=gc, width=1)
    return img


def render(attrs: dict, view: View = View(), size: int = SIZE) -> Image.Image:
    """The image of a product with attributes ``attrs`` (shape, colour, pattern, material, size)
    seen under ``view``. Returns an RGB ``size`` x ``size`` image."""
    top, bottom = BACKGROUNDS[view.background]
    img = Image.composite(Image.new("RGB", (SIZE, SIZE), bottom), Image.new("RGB", (SIZE, SIZE), top), _GRAD)

    scale = SIZES[attrs["size"]] * SIZE / 2
    a = math.radians(view.angle)
    cx, cy = SIZE / 2 + view.dx * SIZE, SIZE / 2 + view.dy * SIZE

    def place(poly, r=1.0):
        out = []
        for x, y in poly:
            x, y = x * r * view.turn, y * r
            out.append((cx + scale * (x * math.cos(a) - y * math.sin(a)),
                        cy + scale * (x * math.sin(a) + y * math.cos(a))))
        return out

    poly = place(SHAPES[attrs["shape"]])
    mask = Image.new("L", (SIZE, SIZE), 0)
    md = ImageDraw.Draw(mask)
    md.polygon(poly, fill=255)
    if attrs["shape"] == "ring":
        md.polygon(place(SHAPES["ring"], 0.5), fill=0)
    # Drop shadow, then the textured body, then a darker outline.
    shadow = mask.filter(ImageFilter.GaussianBlur(3)).point(_SHADOW_LUT)
    img = Image.composite(Image.new("RGB", img.size, (20, 20, 20)),
                          img, shadow.transform(img.size, Image.AFFINE, (1, 0, -3, 0, 1, -3)))
    body = _texture(COLOURS[attrs["colour"]], attrs["pattern"], attrs["material"])
    img = Image.composite(body, img, mask)
    if attrs["material"] == "glossy":
        hl = Image.new("L", (SIZE, SIZE), 0)
        hd = ImageDraw.Draw(hl)
        hx, hy = cx - scale * 0.35, cy - scale * 0.4
        hd.ellipse([hx - scale * 0.25, hy - scale * 0.15, hx + scale * 0.25, hy + scale * 0.15], fill=200)
        hl = Image.composite(hl.filter(ImageFilter.GaussianBlur(3)), Image.new("L", img.size, 0), mask)
        img = Image.composite(Image.new("RGB", img.size, (255, 255, 255)), img, hl)
    ImageDraw.Draw(img).line(poly + poly[:1], fill=_shade(COLOURS[attrs["colour"]], 0.5), width=1)

    # Lighting: a brightness gradient across the image in the light's direction.
    if view.light != 1.0 or view.light_dir:
        lg = _GRAD.rotate(math.degrees(view.light_dir))
        dark = img.point([min(255, int(v * view.light * 0.85)) for v in range(256)] * 3)
        bright = img.point([min(255, int(v * view.light * 1.08)) for v in range(256)] * 3)
        img = Image.composite(bright, dark, lg)
    if size != SIZE:
        img = img.resize((size, size), Image.BICUBIC)
    return img
