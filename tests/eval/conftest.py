"""The generated language-model dataset of the LM tests, shared here."""

from tests.lm.conftest import tiny_dataset

__all__ = ["tiny_dataset"]
