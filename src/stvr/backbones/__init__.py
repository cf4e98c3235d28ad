"""Video backbones: ``i3d`` (paper preset) and ``tiny`` (cpu preset)."""
