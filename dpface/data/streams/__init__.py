"""Training batch streams: the protocol (protocol.py), the backends' registry (registry.py),
and the backends: map-style and P×K over an indexable set, WebDataset and DALI over shards,
with their shared position, slot, decoding and bad-data accounting."""
