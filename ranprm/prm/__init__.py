"""Pure tensor functions of the PRM method: peaks, thresholds, peak backpropagation and instance retrieval.

Nothing here imports Lightning or Hydra: use it on any PyTorch model that maps images to class response maps.
"""
