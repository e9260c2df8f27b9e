"""Small helpers with no knowledge of the method: atomic file writes, stage timing."""
