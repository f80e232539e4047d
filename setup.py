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
    "onnx": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.19"],  # dpface export-onnx
    "eval": ["matplotlib>=3.7", "scikit-image>=0.22"],  # plots; IJB five-point alignment
    "cluster": ["faiss-cpu>=1.8", "scikit-learn>=1.3"],  # dpface cluster: kNN graph, baselines, NMI
    # scikit-image: bundled real faces (integration/test_deploy.py); faiss, scikit-learn: unit/test_cluster.py
    "test": ["pytest>=8", "scikit-image>=0.22", "ruff>=0.6", "faiss-cpu>=1.8", "scikit-learn>=1.3",
             "opencv-python-headless>=4.8"],  # cv2: the insightface-style .bin reader in the tests
    "dev": ["pre-commit>=3", "ruff>=0.6"],  # .pre-commit-config.yaml: `pre-commit install`
}
EXTRAS["all"] = sorted({r for k, v in EXTRAS.items() for r in v if k not in ("dali", "dev")})


def ext_modules():
    """kernels/ as ``dpface._kernels``: the CPU ops always; the CUDA sources too where torch
    has CUDA and nvcc is found. Optional: a machine without a C++ compiler still installs,
    and dpface falls back to the PyTorch reference with one warning (``dpface kernels``)."""
    import glob
    import os

    import torch
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("kernels", "csrc")
    sources = [os.path.join(csrc, "binding.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    args = {"cxx": ["-O3", "-g0", "-fopenmp"]}  # -g0: Python's flags add -g (a 3x slower build)
    kw = dict(include_dirs=[os.path.join(root, csrc)], extra_link_args=["-fopenmp"], optional=True)
    if torch.version.cuda and cpp_extension.CUDA_HOME and os.environ.get("DPFACE_NO_CUDA") != "1":
        sources += [os.path.join(csrc, "cuda_ops.cpp")] + sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        args["cxx"].append("-DDPFACE_WITH_CUDA")
        args["nvcc"] = ["-O3", "-std=c++17", "-DDPFACE_WITH_CUDA"]
        # The archs torch's build will compile for (TORCH_CUDA_ARCH_LIST, else the visible
        # GPUs), recorded so that `dpface kernels` can name them.
        archs = sorted({f.split("code=")[-1].strip("[]'\"") for f in cpp_extension._get_cuda_arch_flags()
                        if "code=" in f})
        args["cxx"].append(f"-DDPFACE_CUDA_ARCHS={'+'.join(archs)}")  # tokens: no shell quoting
        return [cpp_extension.CUDAExtension("dpface._kernels", sources, extra_compile_args=args, **kw)]
    return [cpp_extension.CppExtension("dpface._kernels", sources, extra_compile_args=args, **kw)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


setup(
    name="dpface",
    version="0.1.0",
    description="Distributed face-recognition training: model-parallel margin-softmax heads at 10^6+ classes",
    python_requires=">=3.10",
    packages=find_packages(include=["dpface", "dpface.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    ext_modules=ext_modules(),
    cmdclass=cmdclass(),
    entry_points={"console_scripts": ["dpface=dpface.cli:main"]},
)
