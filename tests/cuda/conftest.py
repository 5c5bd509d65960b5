"""The generated datasets of the language-model and translation tests, shared here."""

from tests.lm.conftest import tiny_dataset
from tests.translation.conftest import parallel_dataset

__all__ = ["parallel_dataset", "tiny_dataset"]
