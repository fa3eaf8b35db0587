"""Check an ImageNet-style folder before training on it, and optionally write a pre-resized copy.

    python scripts/prepare_data.py /data/imagenet                               # check every image
    python scripts/prepare_data.py /data/imagenet /data/imagenet-256 --max-side 256 --workers 16

Every image file under SRC is decoded in full, in parallel (as training would read it: any colour mode, 16-bit and
alpha converted to RGB), with a progress line. Files that cannot be decoded are listed, each with its reason, and the
exit code is 1 (0 with --skip-bad-images). With DST, the readable images are copied there under the same relative
paths, so class folders and their names stay; with --max-side N the copy is shrunk (bicubic, aspect kept) so that its
longer side is at most N pixels, which saves decoding time in budget runs at low resolution. Nothing in SRC is
changed.

The copy finishes or says it did not. Each file is written under a temporary name and renamed when complete.
DST/prepare_data.json records the options first and is marked complete last, with the counts; files that were not
copied (not images, or unreadable) are listed in DST/not_copied.txt. An interrupted copy (Ctrl-C, a full disk) is
completed by running the same command again, which skips the files already written; a copy left unfinished by
unreadable images is completed by removing them from SRC, or by adding --skip-bad-images. DST must be new, empty,
or a copy started by this script with the same SRC and --max-side.

    python scripts/prepare_data.py /data/imagenet /data/imagenet-wds --shards [--shard-size 1000] [--max-side N]
    python scripts/prepare_data.py --index /data/imagenet-1k-wds [--cache-dir DIR]

--shards writes SRC's train/ and val/ class folders as WebDataset tar shards in timm's layout: DST/train-000000.tar,
..., DST/validation-000000.tar, ... of --shard-size samples each, every sample KEY.jpg (the image file's bytes as
they are, or shrunk with --max-side; its own extension for PNG, WebP, ...), KEY.cls (the class index in ASCII) and
KEY.json ({"filename", "label", "class_name"}); the classes in torchvision's ImageFolder order in DST/classes.json,
the shard names and counts in DST/_info.json, and each shard's index (NAME.idx, NVIDIA DALI's format) beside it. The
samples are written in a random order drawn from --seed, so that every shard mixes the classes, and the same SRC and
options give byte-identical shards. Each shard is written under a temporary name, read back and compared with what
was written, and renamed; the same prepare_data.json marker as for a copy says whether the set is complete, and a
rerun completes an unfinished one, keeping the shards already written.

--index writes the missing index files of shards made elsewhere (timm's published ones), beside them or in
--cache-dir, and an _info.json with their counts if ROOT has none; shards already indexed are skipped. A damaged
shard, a sample without an image or without its .cls label, or an image member that is not an image is named in one
line with its shard and key, and the exit code is then 1.
"""
import argparse
import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import random
import re
import signal
import sys
import time
from collections import namedtuple
from multiprocessing import Pool

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # importing torch takes seconds: a Ctrl-C meanwhile gets one line too
    import shards  # noqa: E402
    import utils  # noqa: E402
    from datasets import IMG_EXTENSIONS, check_same_classes, scan_class_folder  # noqa: E402
    from images import BadImageError, load_rgb  # noqa: E402
    from utils import UserError  # noqa: E402
except KeyboardInterrupt:
    print('interrupted before anything was read or written', file=sys.stderr)
    sys.exit(130)

JPEG_QUALITY = 95
MARKER = 'prepare_data.json'
NOT_COPIED = 'not_copied.txt'
MARKER_FORMAT = 1
MADE_BY = 'scripts/prepare_data.py'
TMP_SUFFIX = '.tmp'
WRITTEN, PRESENT = 'written', 'present'  # outcomes of one image besides the reason it is unreadable
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C
SHARD_SIZE = 1000
SPLITS = (('train', 'train'), ('val', 'validation'))  # SRC's folder and the split's name in timm's shard sets
CLASSES_FILE = 'classes.json'


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', nargs='?', default='',
                   help='the data set folder (train/ and val/ with class folders, or any folder of images)')
    p.add_argument('dst', nargs='?', default='', help='where to write the checked (and resized) copy, or the shards')
    p.add_argument('--max-side', type=int, default=0, metavar='N', help='shrink the copy to at most N px per side')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes decoding in parallel')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='leave unreadable images out (listed in DST/not_copied.txt) and exit 0')
    p.add_argument('--shards', action='store_true', help='write SRC as WebDataset tar shards in DST (timm\'s layout)')
    p.add_argument('--shard-size', type=int, default=None, metavar='N',
                   help=f'samples per shard with --shards (default {SHARD_SIZE})')
    p.add_argument('--seed', type=int, default=None, help='the order of the samples in the shards (default 0)')
    p.add_argument('--index', default='', metavar='ROOT',
                   help='write the missing index files (and _info.json) of the shards in ROOT')
    p.add_argument('--cache-dir', default='', metavar='DIR', help='with --index: write the index files in DIR')
    return p


# ---------------------------------------------------------------- the walk

def walk(src):
    """(image files, other files) under src as sorted relative paths; links to folders are not followed."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(src, onerror=unreadable_folder):
        dirnames.sort()
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            (images if name.lower().endswith(IMG_EXTENSIONS) else others).append(rel)
    return sorted(images), sorted(others)


def unreadable_folder(error):
    raise UserError(f'cannot read the folder {error.filename} ({error.strerror}); fix its permissions and run again')


# ---------------------------------------------------------------- one image

def converted(path, img, max_side):
    """The bytes of the copy of the image at path, decoded as img: the file as it is, or shrunk to max_side."""
    if not max_side or max(img.size) <= max_side:
        try:
            with open(path, 'rb') as f:
                return f.read()
        except OSError as e:
            raise BadImageError(f'unreadable image {path} ({e.strerror}); remove or replace it, '
                                'or pass --skip-bad-images') from e
    scale = max_side / max(img.size)
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                       Image.Resampling.BICUBIC)
    options = {'format': Image.registered_extensions()[os.path.splitext(path)[1].lower()]}
    if options['format'] == 'JPEG':
        options['quality'] = JPEG_QUALITY
    if img.info.get('exif'):  # the pixels stay as stored, so the orientation tag keeps its meaning
        options['exif'] = img.info['exif']
    encoded = io.BytesIO()
    small.save(encoded, **options)
    return encoded.getvalue()


def write_file(path, data):
    """Write data to path through a temporary file in the same folder: path exists only once it is complete."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def prepare_one(job):
    """Check one image and write its copy into dst. Returns (relative path, WRITTEN, PRESENT when an earlier run
    wrote it, or the reason it is unreadable). An OSError is a failure to write the copy."""
    src, dst, max_side, rel = job
    out = os.path.join(dst, rel) if dst else ''
    if out and os.path.exists(out):
        return rel, PRESENT
    path = os.path.join(src, rel)
    try:
        img = load_rgb(path)
        data = converted(path, img, max_side) if out else None
    except BadImageError as e:
        return rel, str(e)
    if out:
        write_file(out, data)
    return rel, WRITTEN


# ---------------------------------------------------------------- all images

def start_pool(workers):
    """A pool whose workers leave Ctrl-C to the main process: it reaches every process of the group, and a worker
    that raised KeyboardInterrupt would print its own traceback."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # until the workers ignore it
    try:
        return Pool(workers, initializer=quiet_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def quiet_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # Pool.terminate() sends SIGTERM: unwinding through write_file removes the file being written
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))


class Progress:
    """One line, rewritten in place: images done, unreadable ones, speed."""

    def __init__(self, total, stream):
        self.total, self.stream, self.start = total, stream, time.time()
        self.done = self.unreadable = 0
        self.shown = False

    def add(self, outcome):
        self.advance(1, outcome not in (WRITTEN, PRESENT))

    def advance(self, done, unreadable):
        before = self.done
        self.done += done
        self.unreadable += unreadable
        if self.done // 500 != before // 500 or self.done == self.total:
            rate = self.done / max(time.time() - self.start, 1e-9)
            print(f'\r{self.done}/{self.total} images checked, {self.unreadable} unreadable, {rate:.0f} img/s',
                  end='', file=self.stream, flush=True)
            self.shown = True

    def close(self):
        if self.shown:
            print(file=self.stream, flush=True)


def prepare_all(src, dst, max_side, files, workers, progress=sys.stderr):
    """{relative path: outcome} of every image file, decoded (and written) by `workers` processes."""
    jobs = [(src, dst, max_side, rel) for rel in files]
    meter = Progress(len(files), progress)
    try:
        return collect(in_parallel(prepare_one, jobs, workers, chunksize=16), meter)
    finally:
        meter.close()


def in_parallel(function, jobs, workers, chunksize=1):
    """function(job) of every job, in `workers` processes, in the order they finish."""
    if workers == 1:
        yield from map(function, jobs)
        return
    with start_pool(workers) as pool:
        yield from pool.imap_unordered(function, jobs, chunksize=chunksize)
        pool.close()
        pool.join()


def collect(results, meter):
    outcomes = {}
    for rel, outcome in results:
        outcomes[rel] = outcome
        meter.add(outcome)
    return outcomes


# ---------------------------------------------------------------- DST's state: prepare_data.json

def copy_options(src, max_side):
    """What decides the bytes of the copy: completing a copy takes the same."""
    return {'source': os.path.realpath(src), 'max_side': max_side, 'jpeg_quality': JPEG_QUALITY}


def shard_options(src, max_side, shard_size, seed, listing):
    """A shard set's options also fix the order of its samples: the listing of SRC, --shard-size and --seed."""
    return {**copy_options(src, max_side), 'shard_size': shard_size, 'seed': seed, 'listing': listing}


def kind(options):
    return 'shard set' if 'shard_size' in options else 'copy'


def describe(options):
    sharding = f', --shard-size {options["shard_size"]} and --seed {options["seed"]}' if 'seed' in options else ''
    return f'of {options["source"]} with --max-side {options["max_side"]}{sharding} (JPEG quality ' \
           f'{options["jpeg_quality"]})'


def read_marker(dst, options):
    """The marker of a copy this script started in dst with the same options; None when dst is new or empty.
    UserError for any other dst."""
    path = os.path.join(dst, MARKER)
    if not os.path.isfile(path):
        if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
            raise UserError(f'{dst} exists and is not an empty folder, nor a {kind(options)} started by '
                            'prepare_data.py; pass a new DST')
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path} cannot be read ({type(e).__name__}); pass a new DST') from e
    if not isinstance(marker, dict) or marker.get('made_by') != MADE_BY or marker.get('format') != MARKER_FORMAT \
            or not isinstance(marker.get('options'), dict) or set(marker['options']) not in OPTION_KEYS:
        raise UserError(f'{path} was not written by this version of prepare_data.py; pass a new DST')
    if marker['options'] != options and {**marker['options'], 'listing': 0} == {**options, 'listing': 0}:
        raise UserError(f'{marker["options"]["source"]} has changed since the shard set in {dst} was started '
                        f'(images added, removed or renamed); pass a new DST, or remove {dst} to start again')
    if marker['options'] != options:
        raise UserError(f'{dst} is a {kind(marker["options"])} {describe(marker["options"])}; run with those '
                        'options to complete it, or pass a new DST')
    return marker


OPTION_KEYS = (set(copy_options('', 0)), set(shard_options('', 0, 0, 0, '')))


def write_marker(dst, options, **counts):
    """The copy's marker: written first with complete false, rewritten last with complete true and the counts."""
    marker = {'made_by': MADE_BY, 'format': MARKER_FORMAT, 'complete': bool(counts), 'options': options, **counts}
    write_file(os.path.join(dst, MARKER), (json.dumps(marker, indent=1) + '\n').encode())


def write_not_copied(dst, unreadable, others):
    lines = [f'{rel}\tnot an image file (by its extension)\n' for rel in others]
    lines += [f'{rel}\t{reason}\n' for rel, reason in unreadable.items()]
    write_file(os.path.join(dst, NOT_COPIED), ''.join(sorted(lines)).encode())


# ---------------------------------------------------------------- the command

def check_arguments(src, dst, max_side, workers):
    if not os.path.isdir(src):
        raise UserError(f'{src} is not a folder; pass the data set folder')
    if max_side < 0 or workers < 1:
        raise UserError('--max-side must be >= 0 and --workers >= 1')
    if max_side and not dst:
        raise UserError('--max-side writes a resized copy; pass DST, the folder to write it to')
    if dst:
        real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
        if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
            raise UserError(f'{dst} and {src} overlap; pass a DST outside SRC (SRC is never changed)')


def count(n, noun):
    return f'{n} {noun}{"" if n == 1 else "s"}'


def some(names, limit=5):
    return ', '.join(names[:limit]) + (', ...' if len(names) > limit else '')


def report(args, images, others, outcomes):
    """Print what was found and done; returns {relative path: reason} of the unreadable images."""
    unreadable = {rel: outcomes[rel] for rel in images if outcomes[rel] not in (WRITTEN, PRESENT)}
    for reason in unreadable.values():
        print(reason)  # names the file and why
    if others:
        listed = f'; all in {os.path.join(args.dst, NOT_COPIED)}' if args.dst else ''
        print(f'not images, so not {"copied" if args.dst else "checked"}: {count(len(others), "file")} '
              f'({some(others)}{listed})')
    summary = f'{len(images)} images, {len(unreadable)} unreadable'
    if args.dst:
        earlier = sum(outcome == PRESENT for outcome in outcomes.values())
        summary += f'; {len(images) - len(unreadable)} written to {args.dst}'
        summary += f' ({earlier} of them by an earlier run)' if earlier else ''
    print(summary, flush=True)
    return unreadable


def prepare(args):
    """Check (and copy) SRC; returns the exit code."""
    check_arguments(args.src, args.dst, args.max_side, args.workers)
    options = copy_options(args.src, args.max_side)
    marker = read_marker(args.dst, options) if args.dst else None
    if marker and marker['complete']:
        print(f'{args.dst} is already a complete copy {describe(options)}: {count(marker["written"], "image")} '
              f'written, {count(marker["unreadable"] + marker["not_images"], "file")} not copied; nothing to do')
        return 0
    images, others = walk(args.src)
    if args.dst:
        write_marker(args.dst, options)
    outcomes = prepare_all(args.src, args.dst, args.max_side, images, args.workers)
    unreadable = report(args, images, others, outcomes)
    if args.dst:
        finish_copy(args, options, images, others, unreadable)
    return 1 if unreadable and not args.skip_bad_images else 0


def finish_copy(args, options, images, others, unreadable):
    """List what was not copied, then mark the copy complete, or say why it is not."""
    write_not_copied(args.dst, unreadable, others)
    if unreadable and not args.skip_bad_images:
        utils.exit_with_error(f'{count(len(unreadable), "unreadable image")} not copied, so {args.dst} is '
                              'unfinished; remove or replace them in SRC and run the same command again, or add '
                              '--skip-bad-images to complete the copy without them', code=1)
    write_marker(args.dst, options, images=len(images), written=len(images) - len(unreadable),
                 unreadable=len(unreadable), not_images=len(others))
    print(f'{args.dst} is a complete copy ({os.path.join(args.dst, MARKER)})')


# ---------------------------------------------------------------- --shards: the folder as WebDataset shards

Sample = namedtuple('Sample', 'key rel label class_name')
LEFT_OUT_EARLIER = 'unreadable image (left out by an earlier run with --skip-bad-images)'


class Unfinished(Exception):
    """A shard not written because of unreadable images (without --skip-bad-images)."""


def list_samples(src):
    """(class names, {split: [Sample]}) of SRC's train/ and val/ class folders, as training reads them: classes sorted
    as torchvision's ImageFolder sorts them, the image files of each class as datasets.ImageFolder finds them."""
    folders = [(folder, split) for folder, split in SPLITS if os.path.isdir(os.path.join(src, folder))]
    if not folders:
        raise UserError(f'{src} has no train/ or val/ folder; --shards takes a data set folder with train/ and val/, '
                        'one sub-folder per class')
    classes = {split: sorted(e.name for e in os.scandir(os.path.join(src, folder)) if e.is_dir())
               for folder, split in folders}
    if len(classes) == 2:
        check_same_classes(classes['train'], classes['validation'])
    names = classes[folders[0][1]]
    if not names:
        raise UserError(f'{os.path.join(src, folders[0][0])} holds no class folders; put each class\'s images in '
                        'a sub-folder named after it')
    samples = {}
    for folder, split in folders:
        used, samples[split] = set(), []
        for label, name in enumerate(names):
            for path in scan_class_folder(os.path.join(src, folder, name))[0]:
                key = unique_key(os.path.relpath(path, os.path.join(src, folder)), used)
                samples[split].append(Sample(key, os.path.relpath(path, src), label, name))
    return names, samples


def unique_key(rel, used):
    """A sample key from an image's path in its split: cat/n01_1.JPEG -> cat_n01_1. A dot or white space would end
    or break the key, so they become '_' too; a key taken already gets a number."""
    base = re.sub(r'[\s./\\]', '_', os.path.splitext(rel)[0])
    key, number = base, 1
    while key in used:
        number += 1
        key = f'{base}_{number}'
    used.add(key)
    return key


def listing_digest(samples):
    listed = {split: [list(sample) for sample in split_samples] for split, split_samples in samples.items()}
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()[:16]


def plan_shards(samples, shard_size, seed):
    """[(split, filename, [Sample])]: each split's samples in an order drawn from seed, cut into shards."""
    jobs = []
    for split, listed in samples.items():
        order = list(listed)
        random.Random(seed).shuffle(order)
        for number, start in enumerate(range(0, len(order), shard_size)):
            jobs.append((split, shards.shard_name(split, number), order[start:start + shard_size]))
    return jobs


def image_ext(rel):
    ext = os.path.splitext(rel)[1][1:].lower()
    return 'jpg' if ext == 'jpeg' else ext


def sample_members(sample, data):
    meta = {'filename': sample.rel.replace(os.sep, '/'), 'label': sample.label, 'class_name': sample.class_name}
    return {image_ext(sample.rel): data, 'cls': str(sample.label).encode(), 'json': json.dumps(meta).encode()}


def readable_samples(src, max_side, skip_bad, listed, left_out):
    """(key, members) of the readable images of a shard; unreadable ones go to left_out. Without skip_bad, the first
    one ends the shard: the rest are only checked, so that one run names them all, and Unfinished is raised."""
    for sample in listed:
        path = os.path.join(src, sample.rel)
        try:
            data = converted(path, load_rgb(path), max_side)
        except BadImageError as e:
            left_out[sample.rel] = str(e)
            continue
        if not left_out or skip_bad:
            yield sample.key, sample_members(sample, data)
    if left_out and not skip_bad:
        raise Unfinished


def shard_one(job):
    """Write one shard, or take the one an earlier run wrote; then check its index and labels against the plan.
    Returns (filename, samples in it, {relative path: reason} of the images left out, WRITTEN, PRESENT or '')."""
    src, dst, max_side, skip_bad, filename, listed = job
    path = os.path.join(dst, filename)
    idx = shards.index_path(dst, filename)
    if os.path.isfile(path) and os.path.isfile(idx):
        entries, outcome = shards.read_index(idx), PRESENT
    else:
        left_out = {}
        samples = readable_samples(src, max_side, skip_bad, listed, left_out)
        try:
            first = next(samples, None)
            if first is None:  # every image unreadable: no shard
                return filename, 0, left_out, WRITTEN
            entries, outcome = shards.write_shard(path, itertools.chain([first], samples)), WRITTEN
        except Unfinished:
            return filename, 0, left_out, ''
    return filename, len(entries), check_shard(path, entries, listed), outcome


def check_shard(path, entries, listed):
    """The shard holds the planned samples in the planned order, less the ones left out, with their labels.
    Returns the left-out ones."""
    keys = {entry.key for entry in entries}
    planned = [sample for sample in listed if sample.key in keys]
    if [entry.key for entry in entries] != [sample.key for sample in planned]:
        raise shards.ShardError(f'shard {path} does not hold the samples planned for it; remove it and run the same '
                                'command again')
    with open(path, 'rb') as f:
        for entry, sample in zip(entries, planned):
            if shards.read_member(f, *entry.members['cls']) != str(sample.label).encode():
                raise shards.ShardError(f'shard {path} gives sample {entry.key} another label than its folder '
                                        f'{sample.class_name} ({sample.label}); remove it and run the same command '
                                        'again')
    return {sample.rel: LEFT_OUT_EARLIER for sample in listed if sample.key not in keys}


def write_all_shards(args, jobs, total):
    """{filename: (count, left out, outcome)} of every planned shard, written by --workers processes."""
    work = [(args.src, args.dst, args.max_side, args.skip_bad_images, filename, listed) for _, filename, listed in jobs]
    meter, results = Progress(total, sys.stderr), {}
    try:
        for filename, written, left_out, outcome in in_parallel(shard_one, work, args.workers):
            results[filename] = written, left_out, outcome
            meter.advance(written + len(left_out), len(left_out))
    finally:
        meter.close()
    return results


def make_shards(args):
    """Write SRC as shards in DST (or complete a shard set started there); returns the exit code."""
    check_arguments(args.src, args.dst, args.max_side, args.workers)
    if not args.dst:
        raise UserError('--shards writes shards; pass DST, the folder to write them to')
    args.shard_size = SHARD_SIZE if args.shard_size is None else args.shard_size
    args.seed = args.seed or 0
    if args.shard_size < 1:
        raise UserError('--shard-size must be >= 1')
    classes, samples = list_samples(args.src)
    options = shard_options(args.src, args.max_side, args.shard_size, args.seed, listing_digest(samples))
    marker = read_marker(args.dst, options)
    if marker and marker['complete']:
        print(f'{args.dst} is already a complete shard set {describe(options)}: {count(marker["written"], "image")} '
              f'in {count(marker["shards"], "shard")}; nothing to do')
        return 0
    write_marker(args.dst, options)
    jobs = plan_shards(samples, args.shard_size, args.seed)
    results = write_all_shards(args, jobs, sum(len(listed) for listed in samples.values()))
    unreadable = {rel: reason for _, left_out, _ in results.values() for rel, reason in left_out.items()}
    others = not_in_shards(args.src, samples)
    report_shards(args, jobs, results, unreadable, others)
    write_not_copied(args.dst, unreadable, others)
    if unreadable and not args.skip_bad_images:
        utils.exit_with_error(f'{count(len(unreadable), "unreadable image")} not written, so the shard set in '
                              f'{args.dst} is unfinished; remove or replace them in SRC and pass a new DST, or add '
                              '--skip-bad-images to complete it without them', code=1)
    finish_shards(args, options, classes, jobs, results, unreadable, others)
    return 0


def not_in_shards(src, samples):
    """Files under SRC that no shard holds for a reason other than an unreadable image, with that reason."""
    images, others = walk(src)
    taken = {sample.rel for listed in samples.values() for sample in listed}
    return {**{rel: 'not an image file (by its extension)' for rel in others},
            **{rel: 'not in a class folder of train/ or val/' for rel in images if rel not in taken}}


def report_shards(args, jobs, results, unreadable, others):
    for rel, reason in sorted(unreadable.items()):
        print(reason if reason != LEFT_OUT_EARLIER else f'{rel}: {reason}')
    if others:
        print(f'not written to shards: {count(len(others), "file")} ({some(sorted(others))}; all in '
              f'{os.path.join(args.dst, NOT_COPIED)})')
    written = sum(n for n, _, _ in results.values())
    earlier = sum(outcome == PRESENT for _, _, outcome in results.values())
    by_split = '; '.join(f'{split}: {count(sum(results[name][0] for s, name, _ in jobs if s == split), "sample")} '
                         f'in {count(sum(results[name][0] > 0 for s, name, _ in jobs if s == split), "shard")}'
                         for split in dict.fromkeys(split for split, _, _ in jobs))
    print(f'{written + len(unreadable)} images, {len(unreadable)} unreadable; {written} written to {args.dst} '
          f'({by_split}' + (f'; {count(earlier, "shard")} by an earlier run)' if earlier else ')'), flush=True)


def finish_shards(args, options, classes, jobs, results, unreadable, others):
    """Write classes.json and _info.json, read the set back through them, then mark it complete."""
    splits = {}
    for split, filename, _ in jobs:
        if results[filename][0]:
            splits.setdefault(split, []).append((filename, results[filename][0]))
    write_file(os.path.join(args.dst, CLASSES_FILE), (json.dumps(classes, indent=1) + '\n').encode())
    shards.write_info(args.dst, splits)
    for split, written in splits.items():
        info = shards.load_split_info(args.dst, split)
        if list(zip(info.filenames, info.shard_lengths)) != written:
            raise shards.ShardError(f'{args.dst}/_info.json reads back other shards for {split} than were written; '
                                    'write the shard set again')
    written = sum(n for n, _, _ in results.values())
    write_marker(args.dst, options, images=written + len(unreadable), written=written, unreadable=len(unreadable),
                 not_images=len(others), shards=sum(len(listed) for listed in splits.values()))
    print(f'{args.dst} is a complete shard set ({os.path.join(args.dst, MARKER)})')


# ---------------------------------------------------------------- --index: shards made elsewhere

SHOWN_PER_SHARD = 5


def index_one(job):
    """Index one shard unless its index exists. Returns (filename, samples or None, problem lines, made)."""
    root, filename, cache_dir = job
    path, idx = os.path.join(root, filename), shards.index_path(root, filename, cache_dir)
    if os.path.isfile(idx):
        return filename, shards.index_count(idx), [], False
    try:
        entries = shards.index_shard(path)
        problems = shards.sample_problems(path, entries)
        shards.write_index(entries, idx)
    except shards.ShardError as e:
        return filename, None, [str(e)], False
    return filename, len(entries), problems, True


def index_shards(args):
    """Index the shards in --index ROOT and write its _info.json if it has none; returns the exit code."""
    root, cache_dir = args.index, args.cache_dir or None
    if args.src or args.dst or args.shards or args.max_side:
        raise UserError('--index ROOT takes no SRC, DST, --shards or --max-side; run it on its own')
    if not os.path.isdir(root):
        raise UserError(f'{root} is not a folder; pass the folder that holds the .tar shards')
    names = sorted(name for name in os.listdir(root) if name.endswith('.tar')
                   and os.path.isfile(os.path.join(root, name)))
    if not names:
        raise UserError(f'{root} holds no .tar shards; pass the folder that holds them')
    counts, problems, made = {}, [], 0
    for filename, samples, lines, wrote in in_parallel(index_one, [(root, n, cache_dir) for n in names], args.workers):
        counts[filename], made = samples, made + wrote
        problems += lines[:SHOWN_PER_SHARD]
        if len(lines) > SHOWN_PER_SHARD:
            problems.append(f'shard {os.path.join(root, filename)}: {len(lines) - SHOWN_PER_SHARD} more bad samples')
    problems += check_info(root, counts)
    for line in sorted(problems):
        print(line)
    print(f'{count(len(names), "shard")}: {made} indexed now, {len(names) - made - len(damaged(counts))} before, '
          f'{len(damaged(counts))} damaged; index files in {cache_dir or root}')
    for split, files in shards.group_splits({n: c for n, c in counts.items() if c is not None}).items():
        print(f'{split}: {count(sum(c for _, c in files), "sample")} in {count(len(files), "shard")}')
    if problems:
        print(f'{count(len(problems), "problem")} found: training stops at a bad sample, or skips it with '
              '--skip-bad-images; a damaged shard has no index until it is downloaded again', flush=True)
    return 1 if problems else 0


def damaged(counts):
    return [name for name, samples in counts.items() if samples is None]


def check_info(root, counts):
    """Write root/_info.json from the counts when root has none and no shard is damaged; else compare its counts
    with the indexes'. Returns problem lines."""
    info, info_path = shards.load_info(root)
    if info is None:
        if damaged(counts):
            return [f'{root} has no _info.json, and it is not written while a shard is damaged']
        shards.write_info(root, shards.group_splits(counts))
        print(f'wrote {os.path.join(root, shards.INFO_FILES[0])}')
        return []
    problems = []
    for split, table in info['splits'].items():
        for filename, length in zip(*shards.split_table(table, info_path, split)):
            if filename not in counts and not os.path.isfile(os.path.join(root, filename)):
                problems.append(f'shard {os.path.join(root, filename)} (listed in {info_path}) is missing')
            elif counts.get(filename) is not None and counts[filename] != length:
                problems.append(f'shard {os.path.join(root, filename)} holds {counts[filename]} samples, but '
                                f'{info_path} counts {length}')
    return problems


TASKS = {'copy': 'copy', 'shards': 'shard set', 'index': 'index files'}  # what each task writes


def task_of(args):
    return 'index' if args.index else 'shards' if args.shards else 'copy'


def check_flags(args):
    """Flags that belong to another task are refused rather than ignored."""
    if not args.index and not args.src:
        raise UserError('pass SRC, the data set folder (or --index ROOT, a folder of shards)')
    if not args.shards and (args.shard_size is not None or args.seed is not None):
        raise UserError('--shard-size and --seed set how --shards writes shards; add --shards, or drop them')
    if args.cache_dir and not args.index:
        raise UserError('--cache-dir is where --index ROOT writes index files; add --index ROOT, or drop it')


def write_failure(error, dst, task='copy'):
    """The one line for an OSError, which only writing the copy (the shards, the index files) raises."""
    what = TASKS[task]
    where = re.sub(r'(\.\d+)?\.tmp$', '', error.filename or dst or '')
    reason = f'{where}: {error.strerror}' if error.strerror and where else str(error)
    if not dst:
        return reason
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        other = 'pass --cache-dir DIR' if task == 'index' else 'pass another DST'
        return f'cannot write to {dst} ({reason}); make it writable or {other}'
    full = f'no space left for the {what}' if error.errno in (errno.ENOSPC, errno.EDQUOT) else \
        f'cannot write the {what}'
    unfinished = 'not every shard is indexed' if task == 'index' else f'{dst} is unfinished'
    return f'{full} ({reason}): {unfinished}; free space or fix that, then run the same command again to complete it'


def interrupted(args, task):
    if task == 'index':
        return 'not every shard is indexed'
    return f'the {TASKS[task]} in {args.dst} is unfinished' if args.dst else 'not every image was checked'


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    task = task_of(args)
    try:
        check_flags(args)
        return {'copy': prepare, 'shards': make_shards, 'index': index_shards}[task](args)
    except UserError as e:
        utils.exit_with_error(e)
    except OSError as e:
        utils.exit_with_error(write_failure(e, args.cache_dir or args.index if task == 'index' else args.dst, task))
    except KeyboardInterrupt:
        print(f'interrupted: {interrupted(args, task)}; run the same command again to complete it', file=sys.stderr,
              flush=True)
        sys.exit(INTERRUPTED)


if __name__ == '__main__':
    sys.exit(main())
