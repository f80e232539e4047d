"""Every synthetic generator: procedural faces and the training set over them (faces.py),
verification pairs (pairs.py), mixed-quality templates (templates.py), an IJB-layout set
on disk (ijb.py), 1:N galleries and probes (identification.py), and simulated embedding
pools for clustering (embeddings.py). Each image set renders its own range of sample
indices (``seeding.SAMPLE_RANGES``)."""
