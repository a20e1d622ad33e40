"""The CoOp benchmark datasets (and a synthetic one), read from CoOp's on-disk layout.

Importing this package needs no Dassl. `load_dataset` returns the same samples, labels and
class halves as CoOp/MaPLe for a seed and shares their cache files. `datasets.dassl_glue`
registers the datasets with Dassl; `python -m datasets.prepare NAME --root DIR` fetches and
checks a dataset; `python -m datasets.synthetic --root DIR` writes the offline demo dataset.
"""

from datasets.errors import DatasetConfigError, DatasetError, DatasetFormatError, DatasetLayoutError
from datasets.loading import fewshot_cache_path, load_dataset
from datasets.records import LoadedDataset, Record
from datasets.specs import SPECS, get_spec

__all__ = [
    "DatasetConfigError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetLayoutError",
    "LoadedDataset",
    "Record",
    "SPECS",
    "fewshot_cache_path",
    "get_spec",
    "load_dataset",
]
