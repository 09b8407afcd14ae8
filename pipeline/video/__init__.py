"""Video: frame plans, decoder backends with fallback, and the decode-once view the filters share."""
