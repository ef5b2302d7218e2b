"""The release string: pyproject's version (read from here), the image tag ``kernelgate inject`` writes,
and the ``service.version`` resource attribute of every span."""

__version__ = "0.1.0"
