"""Audio: decode to 16 kHz mono, chunk schedule, batched Silero VAD, STFT feature cache, cut points."""
