"""FluxMusic text-to-music: reference model, rectified flow, pipeline, training."""

__version__ = "0.1.0"
