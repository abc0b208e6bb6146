"""Export a diffusers-format Z-Image folder to a zimage model package (see docs/package-format.md)."""
