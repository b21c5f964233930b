"""cnntrain: transfer learning and training of CNN image classifiers from the command line."""

__version__ = "0.1.0"
