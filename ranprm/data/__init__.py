"""Data: the VOC 2012 layout (real or the embedded synthetic dataset), transforms and the DataModule."""
