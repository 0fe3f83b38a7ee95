"""Where the bundled tiny OLMoE lives in the package: one definition for the server,
which serves it, and for the build and the eval, which make and measure it. A leaf
module (pathlib only), so the server need not import the training or eval packages."""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny-olmoe"
