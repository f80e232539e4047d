"""dpface packaging. Metadata lives here (the product's design names setup.py);
pyproject.toml only declares the build backend.

The compiled kernels (kernels/) hook in here: a CPU C++ extension always, the CUDA
sources only where torch was built with CUDA (torch.version.cuda is set).
"""
from setuptools import find_packages, setup

# torch is pinned: an unpinned requirement pulls a multi-GB CUDA build on CPU machines.
# On a GPU machine install the CUDA build of the same version first.
CORE = [
    "torch==2.13.0",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "pillow>=10.0",
    "tqdm>=4.66",
    "webdataset>=0.2.86",
]
EXTRAS = {
    "wandb": ["wandb>=0.17"],
    "ray": ["ray[train]>=2.9"],
    "deepspeed": ["deepspeed>=0.14"],
    "dali": ["nvidia-dali-cuda120>=1.36"],
    "test": ["pytest>=8"],
}
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() for r in v if k != "dali"})


def ext_modules():
    return []  # kernels/ extension: added with the fused margin-softmax ops


setup(
    name="dpface",
    version="0.1.0",
    description="Distributed face-recognition training: model-parallel margin-softmax heads at 10^6+ classes",
    python_requires=">=3.10",
    packages=find_packages(include=["dpface", "dpface.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    ext_modules=ext_modules(),
    entry_points={"console_scripts": ["dpface=dpface.cli:main"]},
)
