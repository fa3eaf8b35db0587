"""build_dataset(): the datasets behind --data-set; build_transform(): DeiT, 3-Augment and small-image pipelines."""
import json
import math
import os
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision import datasets, transforms
from torchvision.transforms import functional as F

from images import BadImageError, UndecodedJPEG, load_rgb, open_image  # noqa: F401 - BadImageError: for callers
from utils import UserError

DATASETS = ('IMNET', 'FOLDER', 'CIFAR10', 'CIFAR100', 'INAT18', 'INAT19', 'LIST', 'WDS', 'DIGITS', 'FAKE')
DATASET_ALIASES = {'CIFAR': 'CIFAR100', 'INAT': 'INAT18'}  # DeiT's spellings
SMALL_IMAGE_MAX = 32  # inputs of this many pixels or fewer get the small-image pipeline, as in DeiT
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def resolve_data_set(args):
    """--data-set defaults to IMNET when --data-path is given (DeiT's behaviour), else to the embedded DIGITS;
    DeiT's names CIFAR (CIFAR-100) and INAT (iNaturalist 2018) become ours."""
    if args.data_set is None:
        args.data_set = 'IMNET' if args.data_path else 'DIGITS'
    args.data_set = DATASET_ALIASES.get(args.data_set, args.data_set)
    return args.data_set


def build_dataset(is_train, args, uint8=False):
    """Return (dataset, class_names) for the split; class indices are positions in class_names. `uint8`: see
    build_transform."""
    if args.use_lmdb and args.data_set not in ('IMNET', 'FOLDER'):
        raise UserError(f'--use-lmdb reads IMNET / FOLDER data from an LMDB, not {args.data_set}; drop --use-lmdb')
    transform = build_transform(is_train, args, uint8)
    builder = {'IMNET': _image_folder, 'FOLDER': _image_folder, 'CIFAR10': _cifar, 'CIFAR100': _cifar,
               'INAT18': _inat, 'INAT19': _inat, 'LIST': _list, 'WDS': _wds, 'DIGITS': _digits,
               'FAKE': _fake}[args.data_set]
    return builder(is_train, args, transform)


def check_same_classes(train_classes, val_classes):
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise UserError(f'train and val classes differ (only in train: {only_train}, only in val: {only_val}); '
                        'give both splits the same class folders')


def _image_folder(is_train, args, transform):
    if args.use_lmdb:
        from lmdb_dataset import LMDBDataset  # imported here: only --use-lmdb needs the lmdb package
        dataset = LMDBDataset(args.data_path, 'train' if is_train else 'val', transform)
        return dataset, dataset.classes
    root = _require_folder(args.data_path, '--data-path', 'a folder holding train/ and val/ class folders')
    split = os.path.join(root, 'train' if is_train else 'val')
    _require_folder(split, f'{args.data_set} split', 'a train/ and a val/ folder with one sub-folder per class')
    other = os.path.join(root, 'val' if is_train else 'train')
    _require_folder(other, f'{args.data_set} split', 'a train/ and a val/ folder with one sub-folder per class')
    check_same_classes(_class_folders(os.path.join(root, 'train')), _class_folders(os.path.join(root, 'val')))
    dataset = ImageFolder(split, transform=transform, loader=load_rgb)
    return dataset, dataset.classes


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder over a safe walk of each class folder (see scan_class_folder); `skipped` names
    what the walk left out."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples, self.skipped = [], []
        for name in sorted(class_to_idx):
            files, skipped = scan_class_folder(os.path.join(directory, name))
            if not files:
                raise UserError(f'{os.path.join(directory, name)} holds no image files; put at least one JPEG or '
                                'PNG image in every class folder')
            samples += [(path, class_to_idx[name]) for path in files]
            self.skipped += skipped
        return samples


def scan_class_folder(folder):
    """(image paths, skipped entries) under one class folder, sorted.

    Only regular files, or links to them, with an image extension are taken, each real file once. Links to folders
    are followed only when they stay inside the class folder and lead somewhere not walked yet, so a link loop
    (`loop -> .`) or a link out of the class (`up -> ..`) neither repeats images nor files them under this class.
    """
    top = os.path.realpath(folder)
    walked, seen, files, skipped = set(), set(), [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        for name in list(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in walked or os.path.commonpath([top, real]) != top:
                dirnames.remove(name)
                skipped.append(f'{os.path.join(dirpath, name)} (a link out of the class folder or into one walked)')
            else:
                walked.add(real)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            real = os.path.realpath(path)
            if not os.path.isfile(path):
                skipped.append(f'{path} (not a regular file)')
            elif real not in seen:
                seen.add(real)
                files.append(path)
    return sorted(files), skipped


def _class_folders(split):
    return sorted(e.name for e in os.scandir(split) if e.is_dir())


def _require_folder(path, what, expected):
    if not path:
        raise UserError(f'{what} is not set; pass {expected}')
    if not os.path.isdir(path):
        raise UserError(f'{what} {path} does not exist or is not a folder; pass {expected}')
    return path


# ---------------------------------------------------------------- other datasets

def _cifar(is_train, args, transform):
    cls = datasets.CIFAR10 if args.data_set == 'CIFAR10' else datasets.CIFAR100
    root = args.data_path or 'data'
    try:
        dataset = cls(root, train=is_train, transform=transform, download=args.download)
    except RuntimeError as e:
        raise UserError(f'{args.data_set} not found under {root} ({e}); pass --data-path to the folder holding '
                        f'torchvision\'s {cls.base_folder}/ or add --download') from e
    return dataset, dataset.classes


class FileListDataset(torch.utils.data.Dataset):
    """(image, label) samples from a list of (path, label) pairs in `self.samples`, decoded to RGB."""

    samples, transform, loader = (), None, staticmethod(load_rgb)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = self.loader(path)
        return (self.transform(img) if self.transform else img), target


class INatDataset(FileListDataset):
    """iNaturalist 2018 / 2019 in DeiT's layout: train{year}.json, val{year}.json and categories.json.

    Classes are the distinct values of `category` (e.g. 'name', 'genus') in the train annotations.
    """

    def __init__(self, root, train, year, category, transform=None):
        self.transform = transform
        categories = _read_json(os.path.join(root, 'categories.json'))
        train_json = _read_json(os.path.join(root, f'train{year}.json'))
        split_json = train_json if train else _read_json(os.path.join(root, f'val{year}.json'))
        self.classes = []
        class_index = {}
        for ann in train_json['annotations']:
            key = categories[int(ann['category_id'])][category]
            if key not in class_index:
                class_index[key] = len(self.classes)
                self.classes.append(key)
        self.samples = []
        for image in split_json['images']:
            parts = image['file_name'].split('/')
            category_id = int(parts[2])
            path = os.path.join(root, parts[0], parts[2], parts[3])
            self.samples.append((path, class_index[categories[category_id][category]]))



def _read_json(path):
    if not os.path.isfile(path):
        raise UserError(f'{path} is missing; --data-path must hold DeiT\'s iNat layout '
                        '(train<year>.json, val<year>.json, categories.json)')
    with open(path) as f:
        return json.load(f)


def _inat(is_train, args, transform):
    root = _require_folder(args.data_path, '--data-path', 'the iNaturalist folder with its json files')
    year = 2018 if args.data_set == 'INAT18' else 2019
    dataset = INatDataset(root, is_train, year, args.inat_category, transform)
    return dataset, dataset.classes


class ListDataset(FileListDataset):
    """Images named in a list file, one `relative/path.jpg LABEL` per line (DomainNet's layout, used by DHVT).

    Paths are relative to `root`. A class is named after the folder its images sit in when every image of that
    label shares one folder name (DomainNet: clipart/airplane/x.jpg -> 'airplane'), else after its number.
    """

    def __init__(self, root, list_file, transform=None, num_classes=None):
        self.transform = transform
        self.samples = read_list_file(root, list_file)
        labels = {label for _, label in self.samples}
        self.num_classes = num_classes or max(labels) + 1
        folders = {}
        for path, label in self.samples:
            folders.setdefault(label, set()).add(os.path.basename(os.path.dirname(path)))
        self.classes = [next(iter(folders[c])) if len(folders.get(c, ())) == 1 else str(c)
                        for c in range(self.num_classes)]



def read_list_file(root, list_file):
    """[(image path, label)] from a list file; a malformed line is a one-line error naming file and line."""
    if not list_file or not os.path.isfile(list_file):
        raise UserError(f'list file {list_file!r} does not exist; pass --train-list and --val-list files with '
                        'one "relative/path.jpg LABEL" per line')
    samples = []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            path, _, label = line.strip().rpartition(' ')
            if not path or not label.isdigit():
                raise UserError(f'{list_file} line {number}: {line.strip()[:80]!r} is not "path LABEL"; '
                                'write one image path and one non-negative integer label per line')
            samples.append((os.path.join(root, path.strip()), int(label)))
    if not samples:
        raise UserError(f'{list_file} lists no images; write one "relative/path.jpg LABEL" per line')
    return samples


def _list(is_train, args, transform):
    root = _require_folder(args.data_path, '--data-path', 'the folder the list files\' image paths start from')
    train = ListDataset(root, args.train_list)
    if is_train:
        dataset = train
        dataset.transform = transform
    else:
        dataset = ListDataset(root, args.val_list, transform, num_classes=train.num_classes)
        if max(label for _, label in dataset.samples) >= train.num_classes:
            raise UserError(f'{args.val_list} has labels the train list {args.train_list} lacks; '
                            'use the same label numbering in both lists')
    return dataset, train.classes


def _wds(is_train, args, transform):
    from wds_dataset import ShardDataset, class_names
    root = _require_folder(args.data_path, '--data-path', 'a folder of WebDataset shards with their _info.json')
    dataset = ShardDataset(root, args.train_split if is_train else args.val_split,
                           class_names(root, args.num_classes), transform, args.wds_label_key, args.wds_index_dir)
    return dataset, dataset.classes


class ArrayImageDataset(torch.utils.data.Dataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, images, targets, classes, transform=None):
        self.images, self.targets, self.classes, self.transform = images, targets, classes, transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index]).convert('RGB')
        return (self.transform(img) if self.transform else img), int(self.targets[index])


def digits_split(is_train, seed=0, val_fraction=0.2):
    """The 1,797 8x8 handwritten digits that ship with scikit-learn, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    chosen = order[n_val:] if is_train else order[:n_val]
    return images[chosen], digits.target[chosen]


def _digits(is_train, args, transform):
    images, targets = digits_split(is_train)
    classes = [str(i) for i in range(10)]
    return ArrayImageDataset(images, targets, classes, transform), classes


def _fake(is_train, args, transform):
    size = args.fake_size if is_train else max(args.fake_size // 5, 1)
    dataset = datasets.FakeData(size=size, image_size=(3, args.input_size, args.input_size),
                                num_classes=args.fake_classes, transform=transform,
                                random_offset=0 if is_train else 10_000_000)
    return dataset, [str(i) for i in range(args.fake_classes)]


# ---------------------------------------------------------------- preprocessing: what the weights expect

# dest -> (timm pretrained cfg key, the value when nothing says otherwise: DeiT's)
PREPROCESSING = {'mean': ('mean', IMAGENET_DEFAULT_MEAN), 'std': ('std', IMAGENET_DEFAULT_STD),
                 'eval_crop_ratio': ('crop_pct', 0.875), 'interpolation': ('interpolation', 'bicubic')}


def preprocessing(args, key):
    """A resolved preprocessing value (resolve_preprocessing), or DeiT's where it was left unset."""
    value = getattr(args, key, None)
    return PREPROCESSING[key][1] if value is None else value


def resolve_preprocessing(args, weights_args=None):
    """Fill --mean, --std, --eval-crop-ratio and --interpolation left unset with what the weights were made with:
    the args saved in the checkpoint that is read (`weights_args`), else the model's pretrained cfg under
    --pretrained, else DeiT's (ImageNet's mean and std, crop 0.875, bicubic). Returns where the values came from."""
    unset = [key for key in PREPROCESSING if getattr(args, key, None) is None]
    cfg, source = {}, 'DeiT\'s defaults'
    if weights_args and any(weights_args.get(key) is not None for key in PREPROCESSING):
        cfg = {PREPROCESSING[key][0]: weights_args.get(key) for key in PREPROCESSING}
        source = 'the checkpoint'
    elif args.pretrained:
        from timm.models import get_pretrained_cfg
        found = get_pretrained_cfg(args.model)
        cfg, source = (found.to_dict(), f"{args.model}'s pretrained cfg") if found is not None else ({}, source)
    for key in unset:
        value = cfg.get(PREPROCESSING[key][0])
        value = PREPROCESSING[key][1] if value is None else value
        setattr(args, key, [float(v) for v in value] if isinstance(value, (tuple, list)) else value)
    return source if unset else 'the command line'


# ---------------------------------------------------------------- transforms

def build_transform(is_train, args, uint8=False):
    """The pipeline of one split. With `uint8`, it stops at a uint8 (3, H, W) tensor: normalisation and random
    erasing are left to loaders.DeviceFinish, on the device, as timm's prefetcher does."""
    size = args.input_size
    if not is_train:
        return _eval_transform(size, args, uint8)
    if args.ThreeAugment:
        return three_augment_transform(size, args, uint8)
    transform = create_transform(input_size=size, is_training=True, color_jitter=args.color_jitter,
                                 auto_augment=auto_augment_policy(args), interpolation=args.train_interpolation,
                                 re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, hflip=args.hflip,
                                 mean=preprocessing(args, 'mean'), std=preprocessing(args, 'std'),
                                 use_prefetcher=uint8)
    if size <= SMALL_IMAGE_MAX:
        # DeiT swaps the random-resized crop for a padded random crop; images of another size are resized first
        transform.transforms[0:1] = small_image_crop(size)
    else:
        transform.transforms[0] = ReducedDecodeRandomResizedCrop.like(transform.transforms[0])
    return transform


def loader_for(transform):
    """The image reader a training transform wants: undecoded JPEGs for the reduced-decode crop, else RGB images."""
    steps = getattr(transform, 'transforms', ())
    return open_image if steps and isinstance(steps[0], ReducedDecodeRandomResizedCrop) else load_rgb


class ReducedDecodeRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random-resized crop, with the same random draws, that decodes a JPEG only as far as its crop needs.

    The crop is chosen from the header's size; libjpeg then decodes at the largest reduction (1/2, 1/4 or 1/8) that
    still leaves the crop at least the output size, and the crop box is scaled to the reduced image. Without a
    reduction, or for an image already decoded, the result is timm's, pixel for pixel."""

    @classmethod
    def like(cls, crop):
        new = cls.__new__(cls)
        new.__dict__.update(crop.__dict__)
        return new

    def __call__(self, img):
        if not isinstance(img, UndecodedJPEG):
            return super().__call__(img)
        i, j, h, w = self.get_params(img.image, self.scale, self.ratio)  # from the header's size, no pixels yet
        interpolation = random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) \
            else self.interpolation
        reduction = next(k for k in (8, 4, 2, 1) if k == 1 or (h // k >= self.size[0] and w // k >= self.size[1]))
        width, height = img.size  # before decoding: a reduced decode shrinks the image
        decoded = img.decode(reduction)
        if decoded.size == (width, height):
            return F.resized_crop(decoded, i, j, h, w, self.size, interpolation)
        if decoded.size == (math.ceil(width / reduction), math.ceil(height / reduction)):
            sx = sy = 1 / reduction  # libjpeg's 1/k decode: pixel x of the reduced image covers x*k .. x*k + k
        else:
            sx, sy = decoded.width / width, decoded.height / height
        return decoded.resize(self.size[::-1], F.pil_modes_mapping[interpolation],
                              box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))


def auto_augment_policy(args):
    """--aa as timm takes it: None for none."""
    return None if args.aa in (None, '', 'none') else args.aa


def _to_tensor(uint8, args):
    if uint8:
        return [MaybePILToTensor()]
    return [transforms.ToTensor(), transforms.Normalize(preprocessing(args, 'mean'), preprocessing(args, 'std'))]


def _eval_transform(size, args, uint8=False):
    if size <= SMALL_IMAGE_MAX:
        return transforms.Compose([ResizeIfNeeded(size)] + _to_tensor(uint8, args))
    resize = int(size / preprocessing(args, 'eval_crop_ratio'))
    return transforms.Compose([transforms.Resize(resize, interpolation=_interp(preprocessing(args, 'interpolation'))),
                               transforms.CenterCrop(size)] + _to_tensor(uint8, args))


def _interp(name):
    mode = {'bicubic': 'BICUBIC', 'bilinear': 'BILINEAR', 'nearest': 'NEAREST'}.get(name, 'BICUBIC')
    return getattr(transforms.InterpolationMode, mode)


class ResizeIfNeeded:
    """Bicubic resize to size x size, leaving images that already have that size untouched (CIFAR at 32 px)."""

    def __init__(self, size):
        self.size = size
        self.resize = transforms.Resize((size, size), interpolation=_interp('bicubic'))

    def __call__(self, img):
        return img if img.size == (self.size, self.size) else self.resize(img)

    def __repr__(self):
        return f'{type(self).__name__}(size={self.size})'


def small_image_crop(size):
    """DeiT's crop for inputs of 32 px or less (RandomCrop(32, padding=4), zero fill), its padding scaled with the
    size, after a resize for images that are not size x size (DeiT's crop alone only suits CIFAR's 32 x 32)."""
    return [ResizeIfNeeded(size), transforms.RandomCrop(size, padding=max(size // 8, 1))]


class _Solarize:
    def __call__(self, img):
        return ImageOps.solarize(img)


class _GaussianBlur:
    def __init__(self, radius_min=0.1, radius_max=2.0):
        self.radius_min, self.radius_max = radius_min, radius_max

    def __call__(self, img):
        radius = self.radius_min + float(torch.rand(())) * (self.radius_max - self.radius_min)
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def three_augment_transform(size, args, uint8=False):
    """DeiT III's 3-Augment: crop (RandomResizedCrop, or Simple Random Crop with --src), flip, one of
    grayscale / solarize / blur, colour jitter."""
    if args.src:
        crop = [transforms.Resize(size, interpolation=_interp(args.train_interpolation)),
                transforms.RandomCrop(size, padding=4, padding_mode='reflect')]
    else:
        crop = [transforms.RandomResizedCrop(size, interpolation=_interp(args.train_interpolation))]
    steps = crop + [transforms.RandomHorizontalFlip(args.hflip),
                    transforms.RandomChoice([transforms.Grayscale(num_output_channels=3), _Solarize(),
                                             _GaussianBlur()])]
    if args.color_jitter:
        steps.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    return transforms.Compose(steps + _to_tensor(uint8, args))
