"""Few-shot sampling and base/new class halves, reproducing the CoOp protocol exactly.

Sampling must consume the random stream exactly as Dassl's
`DatasetBase.generate_fewshot_dataset` does, or the same seed picks different images than
CoOp/MaPLe: labels in order of first appearance, one `random.sample(items, K)` per label
that has at least K items and no random call for smaller labels (they are kept whole).
"""

import math
import random

from datasets.errors import DatasetConfigError
from datasets.records import Record

SUBSAMPLE_CHOICES = ("all", "base", "new")


def group_by_label(records):
    """{label: [records]} in order of each label's first appearance."""
    groups = {}
    for record in records:
        groups.setdefault(record.label, []).append(record)
    return groups


def sample_few_shot(records, num_shots):
    """Keep `num_shots` random records per label (all of them when a label has fewer).

    Draws from the global `random` stream on purpose: the caller seeds it (Dassl's
    `set_random_seed`) and CoOp's draws continue that same stream.
    """
    if num_shots < 1:
        return list(records)
    sampled = []
    for items in group_by_label(records).values():
        sampled.extend(random.sample(items, num_shots) if len(items) >= num_shots else items)
    return sampled


def class_halves(labels):
    """(base, new): the first ceil(n/2) and the remaining sorted labels."""
    ordered = sorted(set(labels))
    half = math.ceil(len(ordered) / 2)
    return ordered[:half], ordered[half:]


def check_subsample(subsample):
    if subsample not in SUBSAMPLE_CHOICES:
        raise DatasetConfigError(
            f"DATASET.SUBSAMPLE_CLASSES is {subsample!r}; use one of {', '.join(SUBSAMPLE_CHOICES)}."
        )


def subsample_classes(*splits, subsample="all"):
    """Keep the base or new half of the classes in every split and relabel them from 0.

    The halves come from the labels of the first split (the training set), as in CoOp's
    `OxfordPets.subsample_classes`; with "all" the splits are returned unchanged.
    """
    check_subsample(subsample)
    if subsample == "all":
        return list(splits)
    base, new = class_halves(record.label for record in splits[0])
    kept = base if subsample == "base" else new
    new_label = {old: position for position, old in enumerate(kept)}
    return [
        [
            Record(record.impath, new_label[record.label], record.domain, record.classname)
            for record in split
            if record.label in new_label
        ]
        for split in splits
    ]
