"""Multi-object tracking: the ByteTrack algorithm (bytetrack) and its per-sequence driver (sequence)."""
