"""Data: training streams (streams/), formats on disk and converters (formats/), synthetic
sets (synthetic/), and what they share: the ``data:`` config, augmentation, the
device-side transforms and five-point alignment."""
