"""Dassl registration of the datasets: `import datasets.dassl_glue` in train.py.

Registers one `DatasetBase` subclass per dataset under CoOp's class names, so
`DATASET.NAME: "Caltech101"` (configs/datasets/caltech101.yaml) works as in CoOp/MaPLe.
Each class is a thin shell over `datasets.load_dataset`; the few-shot caches it reads and
writes hold Dassl `Datum` objects, interchangeable with CoOp's.
"""

from dassl.data.datasets import DATASET_REGISTRY, DatasetBase, Datum

from datasets.loading import load_dataset
from datasets.specs import FEWSHOT_FOLDER, SPECS
from datasets.transforms import CropBorder


def _to_datums(records):
    return [Datum(impath=r.impath, label=r.label, domain=r.domain, classname=r.classname) for r in records]


class CoOpLayoutDataset(DatasetBase):
    """Reads cfg.DATASET.ROOT / NUM_SHOTS / SUBSAMPLE_CLASSES and cfg.SEED like CoOp's classes.

    `random` must have been seeded with cfg.SEED (train.py does) for CoOp's few-shot samples.
    """

    def __init__(self, cfg):
        spec = SPECS[type(self).__name__]
        self.dataset_dir = spec.dataset_dir(cfg.DATASET.ROOT)
        self.image_dir = spec.path(cfg.DATASET.ROOT, spec.image_dir)
        self.split_fewshot_dir = spec.path(cfg.DATASET.ROOT, FEWSHOT_FOLDER)
        loaded = load_dataset(
            spec.name,
            cfg.DATASET.ROOT,
            num_shots=cfg.DATASET.NUM_SHOTS,
            seed=cfg.SEED,
            subsample=cfg.DATASET.get("SUBSAMPLE_CLASSES", "all"),
        )
        train_x = _to_datums(loaded.train_x)
        test = train_x if loaded.test is loaded.train_x else _to_datums(loaded.test)
        val = test if loaded.val is loaded.test else _to_datums(loaded.val)
        super().__init__(train_x=train_x, val=val or None, test=test)
        # Read by the trainers (duck-typed, so other hosts' datasets simply lack them): the classes
        # of ImageNet a test set covers (datasets.records.ImageNetSubset) and a transform applied to
        # each test image before the usual one (ObjectNet's frame cut off), or None.
        self.imagenet_subset = loaded.imagenet_subset
        self.test_pre_transform = CropBorder(spec.border) if spec.border else None


@DATASET_REGISTRY.register()
class ImageNet(CoOpLayoutDataset):
    dataset_dir = SPECS["ImageNet"].folder


@DATASET_REGISTRY.register()
class Caltech101(CoOpLayoutDataset):
    dataset_dir = SPECS["Caltech101"].folder


@DATASET_REGISTRY.register()
class OxfordPets(CoOpLayoutDataset):
    dataset_dir = SPECS["OxfordPets"].folder


@DATASET_REGISTRY.register()
class StanfordCars(CoOpLayoutDataset):
    dataset_dir = SPECS["StanfordCars"].folder


@DATASET_REGISTRY.register()
class OxfordFlowers(CoOpLayoutDataset):
    dataset_dir = SPECS["OxfordFlowers"].folder


@DATASET_REGISTRY.register()
class Food101(CoOpLayoutDataset):
    dataset_dir = SPECS["Food101"].folder


@DATASET_REGISTRY.register()
class FGVCAircraft(CoOpLayoutDataset):
    dataset_dir = SPECS["FGVCAircraft"].folder


@DATASET_REGISTRY.register()
class SUN397(CoOpLayoutDataset):
    dataset_dir = SPECS["SUN397"].folder


@DATASET_REGISTRY.register()
class DescribableTextures(CoOpLayoutDataset):
    dataset_dir = SPECS["DescribableTextures"].folder


@DATASET_REGISTRY.register()
class EuroSAT(CoOpLayoutDataset):
    dataset_dir = SPECS["EuroSAT"].folder


@DATASET_REGISTRY.register()
class UCF101(CoOpLayoutDataset):
    dataset_dir = SPECS["UCF101"].folder


@DATASET_REGISTRY.register()
class ImageNetV2(CoOpLayoutDataset):
    dataset_dir = SPECS["ImageNetV2"].folder


@DATASET_REGISTRY.register()
class ImageNetSketch(CoOpLayoutDataset):
    dataset_dir = SPECS["ImageNetSketch"].folder


@DATASET_REGISTRY.register()
class ImageNetA(CoOpLayoutDataset):
    dataset_dir = SPECS["ImageNetA"].folder


@DATASET_REGISTRY.register()
class ImageNetR(CoOpLayoutDataset):
    dataset_dir = SPECS["ImageNetR"].folder


@DATASET_REGISTRY.register()
class ObjectNet(CoOpLayoutDataset):
    """The 113 ObjectNet classes shared with ImageNet, read from the release's own layout."""

    dataset_dir = SPECS["ObjectNet"].folder


@DATASET_REGISTRY.register()
class SyntheticShapes(CoOpLayoutDataset):
    """The offline demo dataset written by `python -m datasets.synthetic`."""

    dataset_dir = SPECS["SyntheticShapes"].folder

