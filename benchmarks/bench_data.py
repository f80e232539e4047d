"""Decode + augment throughput: image folder (torch DataLoader) vs WebDataset shards vs DALI CPU.

The same JPEGs (synthetic faces, 112×112) are read by the three paths, each with the
same number of workers, batch size and augmentation (random horizontal flip), and
delivering the same thing: uint8 [B, 3, 112, 112] + int64 labels. Runs are
interleaved (folder, shards, dali, folder, …) so background load on a shared
machine hits all three alike; the median of the repeats is reported.

    python benchmarks/bench_data.py --images 3000 --workers 2 --repeats 3
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dpface.data.formats.convert import convert_synthetic  # noqa: E402
from dpface.data.streams.webdataset import WebDatasetStream  # noqa: E402


class ImageFolderDataset(Dataset):
    """The usual per-file baseline: list files, open + PIL-decode one image per item."""

    def __init__(self, root: str):
        classes = sorted(os.listdir(root))
        self.items = [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, c)))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        img = np.asarray(Image.open(path).convert("RGB"))
        if np.random.random() < 0.5:
            img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), label


def make_data(root: str, images: int) -> tuple[str, str]:
    shards = os.path.join(root, "shards")
    per_id = 30
    m = convert_synthetic(shards, num_identities=max(1, images // per_id), max_images=per_id,
                          min_images=per_id, exponent=0.0, max_shard_samples=250,
                          num_workers=os.cpu_count(), progress=False)
    folder = os.path.join(root, "folder")
    if not os.path.isdir(folder):  # the very same JPEG bytes, one file each
        for s in m["shards"]:
            with tarfile.open(os.path.join(shards, s["name"])) as t:
                members = {n: t.extractfile(n).read() for n in t.getnames()}
            for name, data in members.items():
                if name.endswith(".jpg"):
                    key = name.split(".")[0]
                    label = int(members[key + ".cls"])
                    d = os.path.join(folder, f"{label:06d}")
                    os.makedirs(d, exist_ok=True)
                    with open(os.path.join(d, key + ".jpg"), "wb") as f:
                        f.write(data)
    return shards, folder


def folder_loader(folder, batch, workers):
    return DataLoader(ImageFolderDataset(folder), batch_size=batch, shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0, drop_last=True)


def shards_loader(shards, batch, workers, tar_reader="fast"):
    return WebDatasetStream(shards, batch_size=batch, num_workers=workers, resampled=True,
                            shuffle_buffer=1000, augment=("flip",), tar_reader=tar_reader)


def dali_loader(shards, batch, workers):
    from dpface.data.streams.dali import DaliStream
    return DaliStream(shards, batch_size=batch, num_workers=workers, shuffle_buffer=1000,
                      augment=("flip",), device="cpu")


def evict(root: str) -> None:
    """Drop the data's pages from the page cache (cold-cache runs; needs no root rights)."""
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) + its reaped children (loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(make_loader, n: int) -> tuple[float, float]:
    """(images/s, CPU ms per 1000 images) over n images, worker start-up included.

    Wall-clock throughput depends on what else the machine runs; CPU time per image
    (main process + workers, counted once the workers have exited) much less so.
    """
    gc.collect()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    loader = make_loader()
    seen = 0
    while seen < n:  # several passes for map-style loaders, one stream otherwise
        for x, y in loader:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 112, 112)
            assert y.dtype == torch.int64
            seen += len(y)
            if seen >= n:
                break
    wall = time.perf_counter() - t0
    del loader, x, y
    gc.collect()
    time.sleep(0.3)  # let exiting workers be reaped so their CPU time is counted
    return seen / wall, (_cpu_seconds() - cpu0) / seen * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000, help="distinct JPEGs to generate")
    p.add_argument("--passes", type=int, default=3, help="passes over them per timed run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--root", default=None, help="where to put the data (default: a temp dir)")
    p.add_argument("--cold", action="store_true",
                   help="evict the data from the page cache before every timed run")
    args = p.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="dpface_bench_data_")
    shards, folder = make_data(root, args.images)
    n = (args.images // 30) * 30 * args.passes
    b, w = args.batch_size, args.workers
    paths = {"image folder + DataLoader": lambda: folder_loader(folder, b, w),
             "WebDataset shards": lambda: shards_loader(shards, b, w),
             "WebDataset shards, tarfile reader": lambda: shards_loader(shards, b, w, "webdataset")}
    try:
        import nvidia.dali  # noqa: F401
        paths["DALI CPU"] = lambda: dali_loader(shards, b, w)
    except ImportError:
        print("DALI not installed: skipping its path", file=sys.stderr)
    for make in paths.values():  # warm the page cache and imports, untimed
        measure(make, b)
    rates = {k: [] for k in paths}
    cpu = {k: [] for k in paths}
    load = []
    for _ in range(args.repeats):
        for name, make in paths.items():  # interleaved: background load hits all alike
            if args.cold:
                evict(root)
            load.append(os.getloadavg()[0])
            r, c = measure(make, n)
            rates[name].append(r)
            cpu[name].append(c)
    base = statistics.median(rates["image folder + DataLoader"])
    base_cpu = statistics.median(cpu["image folder + DataLoader"])
    print(f"{n} images per run ({args.images // 30 * 30} JPEGs 112x112 x {args.passes} passes), "
          f"batch {b}, {w} workers, random flip, {'cold' if args.cold else 'warm'} page cache; "
          f"{os.cpu_count()} CPUs, load average during runs {min(load):.1f}-{max(load):.1f}")
    print(f"| path | img/s, median of {args.repeats} | runs | vs folder | CPU us/img | "
          "CPU vs folder |")
    print("|---|---|---|---|---|---|")
    for name in paths:
        med, c = statistics.median(rates[name]), statistics.median(cpu[name])
        print(f"| {name} | {med:.0f} | {', '.join(f'{r:.0f}' for r in rates[name])} | "
              f"{med / base:.2f}x | {c:.0f} | {base_cpu / c:.2f}x |")


if __name__ == "__main__":
    main()
