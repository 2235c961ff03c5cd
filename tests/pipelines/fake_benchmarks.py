"""Small copies of the benchmarks' official downloads, in their exact layout, built by tests.

    write_cifar100_archive(tmp / "cifar-100-python.tar.gz")   # CIFAR-FS and FC100 read this
    write_cub_archive(tmp / "CUB_200_2011.tgz")
    write_tiered_pickles(tmp / "tiered-imagenet") / write_tiered_folders(tmp / "tiered")

The file and folder names, pickle keys and class names are the real ones; only the number of
images per class is small (and the images are tiny and random, coded so a test can tell which image
it is looking at). Written from the publishers' documentation, independently of ``pipelines/``:
a test comparing an import with these lists checks orch's data files too.
"""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

# -- CIFAR-100 (https://www.cs.toronto.edu/~kriz/cifar.html) -------------------------------------

# The superclasses and their classes as the CIFAR page lists them, in the archive's spelling; the
# archive's label ids are the alphabetical order of each list of names.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_COARSE = sorted(CIFAR100_SUPERCLASSES)
CIFAR100_FINE = sorted(c for classes in CIFAR100_SUPERCLASSES.values() for c in classes)
CIFAR100_SUPERCLASS = {c: s for s, classes in CIFAR100_SUPERCLASSES.items() for c in classes}


def cifar100_image(fine: int, index: int) -> np.ndarray:
    """The uint8 [3072] row (R, G, B planes of 32x32) of image ``index`` of class ``fine``:
    random, with the class id and the index in the first two red values."""
    row = np.random.default_rng([fine, index]).integers(0, 256, 3072, dtype=np.uint8)
    row[0], row[1] = fine, index
    return row


def write_cifar100_archive(path: Path, *, train_per_class: int = 1, test_per_class: int = 1,
                           unpacked: bool = False) -> Path:
    """``cifar-100-python.tar.gz`` as published (members ``cifar-100-python/{file.txt~, train,
    test, meta}``), with this many images per class in each file; ``unpacked``: the folder
    ``path/cifar-100-python`` instead. Returns the archive (or folder)."""
    members = {"file.txt~": b""}
    offset = 0
    for member, per_class, label in (("train", train_per_class, "training"),
                                     ("test", test_per_class, "testing")):
        fine = [c for c in range(100) for _ in range(per_class)]
        rows = [cifar100_image(c, offset + i % per_class) for i, c in enumerate(fine)]
        members[member] = py2_pickle({
            b"filenames": [f"{CIFAR100_FINE[c]}_s_{offset + i % per_class:06d}.png".encode()
                           for i, c in enumerate(fine)],
            b"batch_label": f"{label} batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [CIFAR100_COARSE.index(CIFAR100_SUPERCLASS[CIFAR100_FINE[c]]) for c in fine],
            b"data": np.stack(rows),
        })
        offset += per_class
    members["meta"] = py2_pickle({b"fine_label_names": [n.encode() for n in CIFAR100_FINE],
                                  b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE]})
    if unpacked:
        folder = path / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, data in members.items():
            (folder / name).write_bytes(data)
        return folder
    write_tar(path, {f"cifar-100-python/{name}": data for name, data in members.items()},
              folders=["cifar-100-python"])
    return path


# -- CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/) ------------------------

# classes.txt of the archive: class id i + 1 is the i-th folder.
CUB_CLASSES = [
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
    "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet",
    "008.Rhinoceros_Auklet", "009.Brewer_Blackbird", "010.Red_winged_Blackbird",
    "011.Rusty_Blackbird", "012.Yellow_headed_Blackbird", "013.Bobolink", "014.Indigo_Bunting",
    "015.Lazuli_Bunting", "016.Painted_Bunting", "017.Cardinal", "018.Spotted_Catbird",
    "019.Gray_Catbird", "020.Yellow_breasted_Chat", "021.Eastern_Towhee", "022.Chuck_will_Widow",
    "023.Brandt_Cormorant", "024.Red_faced_Cormorant", "025.Pelagic_Cormorant",
    "026.Bronzed_Cowbird", "027.Shiny_Cowbird", "028.Brown_Creeper", "029.American_Crow",
    "030.Fish_Crow", "031.Black_billed_Cuckoo", "032.Mangrove_Cuckoo", "033.Yellow_billed_Cuckoo",
    "034.Gray_crowned_Rosy_Finch", "035.Purple_Finch", "036.Northern_Flicker",
    "037.Acadian_Flycatcher", "038.Great_Crested_Flycatcher", "039.Least_Flycatcher",
    "040.Olive_sided_Flycatcher", "041.Scissor_tailed_Flycatcher", "042.Vermilion_Flycatcher",
    "043.Yellow_bellied_Flycatcher", "044.Frigatebird", "045.Northern_Fulmar", "046.Gadwall",
    "047.American_Goldfinch", "048.European_Goldfinch", "049.Boat_tailed_Grackle",
    "050.Eared_Grebe", "051.Horned_Grebe", "052.Pied_billed_Grebe", "053.Western_Grebe",
    "054.Blue_Grosbeak", "055.Evening_Grosbeak", "056.Pine_Grosbeak", "057.Rose_breasted_Grosbeak",
    "058.Pigeon_Guillemot", "059.California_Gull", "060.Glaucous_winged_Gull", "061.Heermann_Gull",
    "062.Herring_Gull", "063.Ivory_Gull", "064.Ring_billed_Gull", "065.Slaty_backed_Gull",
    "066.Western_Gull", "067.Anna_Hummingbird", "068.Ruby_throated_Hummingbird",
    "069.Rufous_Hummingbird", "070.Green_Violetear", "071.Long_tailed_Jaeger",
    "072.Pomarine_Jaeger", "073.Blue_Jay", "074.Florida_Jay", "075.Green_Jay",
    "076.Dark_eyed_Junco", "077.Tropical_Kingbird", "078.Gray_Kingbird", "079.Belted_Kingfisher",
    "080.Green_Kingfisher", "081.Pied_Kingfisher", "082.Ringed_Kingfisher",
    "083.White_breasted_Kingfisher", "084.Red_legged_Kittiwake", "085.Horned_Lark",
    "086.Pacific_Loon", "087.Mallard", "088.Western_Meadowlark", "089.Hooded_Merganser",
    "090.Red_breasted_Merganser", "091.Mockingbird", "092.Nighthawk", "093.Clark_Nutcracker",
    "094.White_breasted_Nuthatch", "095.Baltimore_Oriole", "096.Hooded_Oriole",
    "097.Orchard_Oriole", "098.Scott_Oriole", "099.Ovenbird", "100.Brown_Pelican",
    "101.White_Pelican", "102.Western_Wood_Pewee", "103.Sayornis", "104.American_Pipit",
    "105.Whip_poor_Will", "106.Horned_Puffin", "107.Common_Raven", "108.White_necked_Raven",
    "109.American_Redstart", "110.Geococcyx", "111.Loggerhead_Shrike", "112.Great_Grey_Shrike",
    "113.Baird_Sparrow", "114.Black_throated_Sparrow", "115.Brewer_Sparrow",
    "116.Chipping_Sparrow", "117.Clay_colored_Sparrow", "118.House_Sparrow", "119.Field_Sparrow",
    "120.Fox_Sparrow", "121.Grasshopper_Sparrow", "122.Harris_Sparrow", "123.Henslow_Sparrow",
    "124.Le_Conte_Sparrow", "125.Lincoln_Sparrow", "126.Nelson_Sharp_tailed_Sparrow",
    "127.Savannah_Sparrow", "128.Seaside_Sparrow", "129.Song_Sparrow", "130.Tree_Sparrow",
    "131.Vesper_Sparrow", "132.White_crowned_Sparrow", "133.White_throated_Sparrow",
    "134.Cape_Glossy_Starling", "135.Bank_Swallow", "136.Barn_Swallow", "137.Cliff_Swallow",
    "138.Tree_Swallow", "139.Scarlet_Tanager", "140.Summer_Tanager", "141.Artic_Tern",
    "142.Black_Tern", "143.Caspian_Tern", "144.Common_Tern", "145.Elegant_Tern",
    "146.Forsters_Tern", "147.Least_Tern", "148.Green_tailed_Towhee", "149.Brown_Thrasher",
    "150.Sage_Thrasher", "151.Black_capped_Vireo", "152.Blue_headed_Vireo",
    "153.Philadelphia_Vireo", "154.Red_eyed_Vireo", "155.Warbling_Vireo", "156.White_eyed_Vireo",
    "157.Yellow_throated_Vireo", "158.Bay_breasted_Warbler", "159.Black_and_white_Warbler",
    "160.Black_throated_Blue_Warbler", "161.Blue_winged_Warbler", "162.Canada_Warbler",
    "163.Cape_May_Warbler", "164.Cerulean_Warbler", "165.Chestnut_sided_Warbler",
    "166.Golden_winged_Warbler", "167.Hooded_Warbler", "168.Kentucky_Warbler",
    "169.Magnolia_Warbler", "170.Mourning_Warbler", "171.Myrtle_Warbler", "172.Nashville_Warbler",
    "173.Orange_crowned_Warbler", "174.Palm_Warbler", "175.Pine_Warbler", "176.Prairie_Warbler",
    "177.Prothonotary_Warbler", "178.Swainson_Warbler", "179.Tennessee_Warbler",
    "180.Wilson_Warbler", "181.Worm_eating_Warbler", "182.Yellow_Warbler",
    "183.Northern_Waterthrush", "184.Louisiana_Waterthrush", "185.Bohemian_Waxwing",
    "186.Cedar_Waxwing", "187.American_Three_toed_Woodpecker", "188.Pileated_Woodpecker",
    "189.Red_bellied_Woodpecker", "190.Red_cockaded_Woodpecker", "191.Red_headed_Woodpecker",
    "192.Downy_Woodpecker", "193.Bewick_Wren", "194.Cactus_Wren", "195.Carolina_Wren",
    "196.House_Wren", "197.Marsh_Wren", "198.Rock_Wren", "199.Winter_Wren",
    "200.Common_Yellowthroat",

]


def cub_image(class_index: int, index: int, *, width: int = 24, height: int = 16) -> np.ndarray:
    """An RGB photo-like [height, width, 3] image: a flat colour coding (class, index), a white
    square where its bounding box is (``cub_box``)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = (class_index, 10 * index, 200)
    x, y, w, h = cub_box(index, width=width, height=height)
    pixels[int(y):int(y + h), int(x):int(x + w)] = 255
    return pixels


def cub_box(index: int, *, width: int = 24, height: int = 16) -> tuple[float, float, float, float]:
    return (2.0 + index, 3.0, width / 2, height / 2)


def write_cub_archive(path: Path, *, per_class: int = 2, unpacked: bool = False,
                      classes: list[str] | None = None) -> Path:
    """``CUB_200_2011.tgz`` as published (the top-level attributes.txt, then CUB_200_2011/ with the
    index files, README, attributes/, parts/ and images/<class>/<file>.jpg), ``per_class`` JPEGs
    per class; ``unpacked``: the folder ``path/CUB_200_2011`` instead. Returns archive or folder."""
    classes = CUB_CLASSES if classes is None else classes
    files: dict[str, bytes] = {}
    images, labels, boxes, split = [], [], [], []
    image_id = 0
    for c, folder in enumerate(classes, start=1):
        for i in range(per_class):
            image_id += 1
            name = f"{folder}/{folder.split('.', 1)[1]}_{i:04d}_{image_id}.jpg"
            files[f"images/{name}"] = jpeg_bytes(cub_image(c, i))
            images.append(f"{image_id} {name}")
            labels.append(f"{image_id} {c}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in cub_box(i)))
            split.append(f"{image_id} {i % 2}")
    files["classes.txt"] = "".join(f"{c} {n}\n" for c, n in enumerate(classes, start=1)).encode()
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("bounding_boxes.txt", boxes), ("train_test_split.txt", split)):
        files[name] = "".join(f"{line}\n" for line in lines).encode()
    files["README"] = b"CUB-200-2011 (fake, for tests)\n"
    files["attributes/certainties.txt"] = b"1 not visible\n"
    files["parts/parts.txt"] = b"1 back\n"
    if unpacked:
        folder = path / "CUB_200_2011"
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return folder
    members = {"attributes.txt": b"1 has_bill_shape::curved_(up_or_down)\n"}
    members.update({f"CUB_200_2011/{name}": data for name, data in sorted(files.items())})
    folders = ["CUB_200_2011", "CUB_200_2011/images", *(f"CUB_200_2011/images/{c}" for c in classes)]
    return write_tar(path, members, folders=folders)


# -- tieredImageNet (https://github.com/renmengye/few-shot-ssl-public) -----------------------------


def tiered_image(class_index: int, index: int, side: int = 84) -> np.ndarray:
    pixels = np.random.default_rng([class_index, index]).integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = class_index % 256, index
    return pixels


def write_tiered_pickles(folder: Path, splits: dict[str, list[str]], words: dict[str, str], *,
                         per_class: int = 1, side: int = 84, name_files: bool = True) -> Path:
    """Ren et al.'s caches as in tiered-imagenet.tar: {split}_images_png.pkl (a list of PNG-encoded
    uint8 arrays, shaped [n, 1] as cv2.imencode returns them) and {split}_labels.pkl (label_specific,
    label_general, label_specific_str with ImageNet's words, label_general_str), written by Python 3
    (str keys, the highest protocol); ``name_files``: class_names.txt and synsets.txt beside them."""
    import pickle

    folder.mkdir(parents=True, exist_ok=True)
    for split, wnids in splits.items():
        images, specific = [], []
        for c, wnid in enumerate(wnids):
            for i in range(per_class):
                encoded = np.frombuffer(png_bytes(tiered_image(c, i, side)), np.uint8)
                images.append(encoded.reshape(-1, 1))
                specific.append(c)
        labels = {"label_specific": np.array(specific, np.int32),
                  "label_general": np.zeros(len(specific), np.int32),
                  "label_specific_str": [words[w] for w in wnids],
                  "label_general_str": {0: "entity"}}
        (folder / f"{split}_images_png.pkl").write_bytes(pickle.dumps(images, pickle.HIGHEST_PROTOCOL))
        (folder / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, pickle.HIGHEST_PROTOCOL))
    if name_files:
        every = [w for wnids in splits.values() for w in wnids]
        (folder / "class_names.txt").write_text("".join(f"{words[w]}\n" for w in every))
        (folder / "synsets.txt").write_text("".join(f"{w}\n" for w in every))
    return folder


def write_tiered_folders(folder: Path, splits: dict[str, list[str]], *, per_class: int = 1,
                         side: int = 12) -> Path:
    """The class-folder layout: {train,val,test}/<WordNet id>/<WordNet id>_<n>.JPEG."""
    for split, wnids in splits.items():
        for c, wnid in enumerate(wnids):
            for i in range(per_class):
                target = folder / split / wnid / f"{wnid}_{i}.JPEG"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(jpeg_bytes(tiered_image(c, i, side)))
    return folder


# -- writing archives and Python 2 pickles ------------------------------------------------------


def write_tar(path: Path, files: dict[str, bytes], *, folders: Iterable[str] = (),
              links: dict[str, str] | None = None) -> Path:
    """A tar (gzip-compressed if the name ends in gz) of ``files`` (member name -> bytes), with
    folder entries first and ``links`` (member -> target) as symbolic links, in that order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith(("gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_300_000_000
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_300_000_000
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def py2_pickle(value: Any) -> bytes:
    """``value`` as Python 2's cPickle wrote it at protocol 2: bytes are Python 2 strings
    (SHORT_BINSTRING/BINSTRING), NumPy arrays are numpy.core.multiarray._reconstruct plus state.
    The official CIFAR-100 files look like this; Python 3's pickle cannot write it."""
    return b"\x80\x02" + _py2(value) + b"."


def _py2(value: Any) -> bytes:
    if isinstance(value, bytes):
        if len(value) < 256:
            return b"U" + bytes([len(value)]) + value
        return b"T" + struct.pack("<i", len(value)) + value
    if isinstance(value, bool) or value is None:
        return {True: b"\x88", False: b"\x89", None: b"N"}[value]
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if 0 <= value < 256:
            return b"K" + bytes([value])
        return b"J" + struct.pack("<i", value)
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in value.items()) + b"u"
    if isinstance(value, list):
        return b"](" + b"".join(_py2(v) for v in value) + b"e"
    if isinstance(value, tuple):
        return b"(" + b"".join(_py2(v) for v in value) + b"t"
    if isinstance(value, np.ndarray):
        dtype = (b"cnumpy\ndtype\n" + _py2((value.dtype.str[1:].encode(), 0, 1)) + b"R"
                 + _py2((3, value.dtype.str[0].encode(), None, None, None, -1, -1, 0)) + b"b")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2((0,)) + _py2(b"b")
                + b"\x87R" + b"(" + _py2(1) + _py2(tuple(value.shape)) + dtype + _py2(False)
                + _py2(np.ascontiguousarray(value).tobytes()) + b"tb")
    raise TypeError(f"py2_pickle cannot write {type(value).__name__}")


def evil_pickle() -> bytes:
    """A pickle that runs ``os.system`` when loaded by ``pickle.load`` (never load it so)."""
    return b"\x80\x02cposix\nsystem\nU\x0becho pwned!\x85R."


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
