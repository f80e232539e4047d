"""Face clustering: GCN linkage over a kNN graph (Wang et al., CVPR 2019), baselines, metrics,
self-training on pseudo-labelled clusters.

Modules (import them directly; this package imports nothing heavy, so building the CLI
parser stays torch-free):

* ``knn``        checked embeddings, the faiss kNN graph, :class:`ClusterError`
* ``gcn``        instance-pivot subgraphs (IPS), the linkage GCN, its training and file
* ``linkage``    edges → clusters (threshold, connected components, pseudo label propagation)
* ``metrics``    pairwise / BCubed precision, recall, F; NMI
* ``baselines``  agglomerative (cosine, average linkage, tuned threshold) and k-means
* ``embed``      embeddings of a converted shard set with a checkpoint's backbone
* ``self_train`` pool → clusters → pseudo-labelled shard set → continued training
* ``cli``        ``dpface cluster`` and ``dpface cluster train-gcn``
"""
