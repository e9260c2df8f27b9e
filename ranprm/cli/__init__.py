"""What the entry points share: config discovery and composition, one-line user errors, sweeps, inference overrides."""
