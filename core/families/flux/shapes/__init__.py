"""A small FLUX-shaped model pretrained on synthetic scenes (coloured circles, squares and
triangles on plain backgrounds), shipped as one file, so demos and tests can see learning."""
from .packed import SHIPPED, build_shapes_flux

__all__ = ["SHIPPED", "build_shapes_flux"]
