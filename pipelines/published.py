"""The published class splits of few-shot benchmarks, read from the data files in ``pipelines/splits/``.

Each file is JSON: ``name``, ``paper`` and ``source`` (where its lists were taken from, with the
commit), ``by`` ("class" or "superclass": what the lists name) and ``splits`` (train/val/test
lists), plus what a benchmark needs besides (``superclass`` of each class, ``words`` of WordNet ids,
``archive`` digests of the official download). The importers read them; nothing else defines a split.

    cifar_fs.json         CIFAR-FS, 64/16/20 classes          (Bertinetto et al. 2019)
    fc100.json            FC100, 12/4/4 superclasses          (Oreshkin et al. 2018)
    cifar100.json         the official CIFAR-100 python archive: name, members, digests
    tiered_imagenet.json  tieredImageNet, 351/97/160 classes in 20/6/8 categories (Ren et al. 2018)
    cub.json              CUB-200-2011, 100/50/50 classes     (Chen et al. 2019)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

FOLDER = "splits"


@dataclass(frozen=True)
class Published:
    """One data file of ``pipelines/splits``."""

    key: str
    data: dict[str, Any]
    sha256: str

    @property
    def splits(self) -> dict[str, list[str]]:
        return self.data["splits"]

    @property
    def superclass(self) -> dict[str, str]:
        return self.data.get("superclass", {})

    def split_of(self) -> dict[str, str]:
        return {member: split for split, members in self.splits.items() for member in members}

    def definition(self) -> dict[str, Any]:
        """How an import's manifest names the split it used."""
        return {"file": f"pipelines/{FOLDER}/{self.key}.json", "sha256": self.sha256,
                "name": self.data["name"], "paper": self.data["paper"], "source": self.data["source"]}


def published(key: str) -> Published:
    """The data file ``pipelines/splits/<key>.json`` (shipped in the package)."""
    raw = resources.files("pipelines").joinpath(FOLDER, f"{key}.json").read_bytes()
    return Published(key, json.loads(raw), hashlib.sha256(raw).hexdigest())
