"""Datasets: Fashion-MNIST / MNIST / CIFAR-10 loaders and the procedural, captioned shapes dataset."""
from minidiff.data.datasets import CLASS_NAMES, ImageDataset, caption_for_label, load_dataset
from minidiff.data.shapes import ShapesDataset, make_shapes

__all__ = ["load_dataset", "ImageDataset", "CLASS_NAMES", "caption_for_label", "ShapesDataset", "make_shapes"]
