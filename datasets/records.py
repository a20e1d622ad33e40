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


@dataclass(frozen=True)
class ImageNetSubset:
    """Where the classes of a test set that covers only some of ImageNet's classes sit among them
    (ImageNet-A, -R, ObjectNet): `imagenet_classnames` names all ImageNet classes in label order,
    `members[i]` holds the ImageNet labels of class i (one each for ImageNet-A/-R; ObjectNet
    classes may merge several, e.g. 'alarm clock' = analog clock + digital clock)."""

    imagenet_classnames: tuple
    members: tuple


@dataclass
class LoadedDataset:
    """The splits a Dassl `DatasetBase` receives; val is empty for test-only datasets.

    Class names come from train_x only, as in Dassl, which is why test-only datasets pass
    their test list as train_x. `imagenet_subset` is set for test sets whose classes are a
    subset of ImageNet's.
    """

    train_x: list
    val: list
    test: list
    imagenet_subset: ImageNetSubset = None
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
