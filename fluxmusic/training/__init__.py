"""Training: the generic loop (``loop.train``), its ``TrainTask`` interface, and the transformer trainer."""
