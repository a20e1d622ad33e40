"""Image records and a loaded dataset, without Dassl.

`Record` has the four attributes of Dassl's `Datum` (impath, label, domain, classname), so
Dassl's `DatasetWrapper` can read it; the Dassl glue still converts records to `Datum`.
"""

from dataclasses import dataclass, field
from typing import NamedTuple


class Record(NamedTuple):
    """One image. A named tuple: ImageNet has 1.3M of them, and tuples build several times faster."""

    impath: str
    label: int
    domain: int = 0
    classname: str = ""


@dataclass
class LoadedDataset:
    """The splits a Dassl `DatasetBase` receives; val is empty for test-only datasets.

    Class names come from train_x only, as in Dassl, which is why test-only datasets pass
    their test list as train_x.
    """

    train_x: list
    val: list
    test: list
    lab2cname: dict = field(init=False)

    def __post_init__(self):
        self.lab2cname = {record.label: record.classname for record in self.train_x}

    @property
    def num_classes(self):
        """max(label) + 1, as Dassl counts it (labels are contiguous after loading)."""
        return max(self.lab2cname) + 1

    @property
    def classnames(self):
        return [self.lab2cname[label] for label in sorted(self.lab2cname)]
