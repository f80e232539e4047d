"""Data on disk: WebDataset shards and their manifest (shards.py), insightface RecordIO
(recordio.py), and the converters that write shards (convert.py)."""
