from setuptools import find_packages, setup

setup(
    name="comformer",
    version="0.1.0",
    description="Continual semantic and panoptic segmentation on Mask2Former, as a detectron2 extension",
    packages=find_packages(include=["comformer", "comformer.*"]),
    # Class tables the dataset registration reads (ADE20K categories, instance-id mapping).
    package_data={"comformer.data.datasets": ["*.json", "*.txt"]},
    python_requires=">=3.10",
    # Runtime dependencies are pinned in requirements.txt; detectron2 is installed separately
    # (see the Makefile), so it is not listed here for pip to resolve.
    install_requires=["torch", "torchvision", "numpy<2", "scipy", "fvcore", "pycocotools", "opencv-python-headless", "matplotlib"],
)
