"""WebDataset tar shards: their sample index, their info file, and writing them.

A shard is an uncompressed tar whose members form samples: consecutive members that share a key (the name up to the
first dot after the last '/') are one sample, each member named by its extension (`KEY.jpg`, `KEY.cls`, `KEY.json`).
Reading a shard by sample needs each member's byte offset: `index_shard` finds them by stepping over the tar headers
once, and the index is kept beside the shard (or in a cache folder) in NVIDIA DALI's webdataset index format, the
output of DALI's `wds2idx`, so that `fn.readers.webdataset(index_paths=...)` reads the same files:

    v1.2 NUMBER_OF_SAMPLES
    EXT OFFSET SIZE MEMBER_NAME EXT OFFSET SIZE MEMBER_NAME ...      (one line per sample)

OFFSET is where the member's data starts (a multiple of 512), SIZE its length in bytes.

Each split's shard names and sample counts are in ROOT/_info.json, in timm's layout (timm's published
`timm/imagenet-1k-wds` and its siblings ship one):

    {"name": ..., "splits": {"train": {"name": "train", "num_samples": N, "filenames": [...],
                                       "shard_lengths": [...]}, "validation": {...}}}
"""
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from collections import namedtuple

from utils import UserError

SampleIndex = namedtuple('SampleIndex', 'key members')  # members: {ext: (offset, size) of the member's data}
SplitInfo = namedtuple('SplitInfo', 'name filenames shard_lengths num_samples')

INDEX_VERSION = 'v1.2'
INFO_FILES = ('_info.json', 'info.json')  # the names timm's reader looks for, in its order
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'ppm', 'pgm', 'tif', 'tiff')
BLOCK = tarfile.BLOCKSIZE
COMPRESSIONS = ((b'\x1f\x8b', 'gzip'), (b'BZh', 'bzip2'), (b'\xfd7zXZ\x00', 'xz'), (b'\x28\xb5\x2f\xfd', 'zstd'))


class ShardError(UserError):
    """A shard, index or info file that cannot be read as it should: one line naming the file and the problem."""


def index_command(root):
    return f'python scripts/prepare_data.py --index {root}'


# ---------------------------------------------------------------- reading a tar

def split_name(name):
    """(key, ext) of a member name, as webdataset and DALI group members; (None, None) for a name without a dot
    after its last '/', or a hidden file: such members belong to no sample."""
    start = name.rfind('/') + 1
    dot = name.find('.', start)
    if dot <= start:
        return None, None
    return name[:dot], name[dot + 1:]


def index_shard(tar_path):
    """The samples of an uncompressed tar, in tar order, from its headers alone. ShardError for a compressed,
    truncated or corrupt tar, or one that holds no samples."""
    check_uncompressed(tar_path)
    size = os.path.getsize(tar_path)
    entries, end = [], 0
    try:
        with tarfile.open(tar_path, 'r:') as tar:
            while (member := tar.next()) is not None:
                end = member.offset_data + -(-member.size // BLOCK) * BLOCK
                if member.offset_data + member.size > size:
                    raise ShardError(f'shard {tar_path} is truncated in {sample_of(member.name)}: its member '
                                     f'{member.name} ends past the end of the file; {REMEDY}')
                if member.isreg():
                    add_member(entries, member, tar_path)
    except tarfile.ReadError as e:
        if not entries and end == 0:
            raise ShardError(f'{tar_path} is not a tar file ({e}); pass uncompressed WebDataset .tar shards') from e
        raise ShardError(f'shard {tar_path} is corrupt after {last_sample(entries)} ({e}); {REMEDY}') from e
    check_end(tar_path, end, size, entries)
    if not entries:
        raise ShardError(f'shard {tar_path} holds no samples (no member is named KEY.EXT); pass WebDataset shards')
    return entries


REMEDY = 'download or write the shard again'


def sample_of(name):
    key = split_name(name)[0]
    return f'sample {key}' if key else f'member {name}'


def last_sample(entries):
    return f'sample {entries[-1].key}' if entries else 'its first sample'


def check_uncompressed(tar_path):
    try:
        with open(tar_path, 'rb') as f:
            head = f.read(6)
    except OSError as e:
        raise ShardError(f'cannot read shard {tar_path} ({e.strerror})') from e
    for magic, name in COMPRESSIONS:
        if head.startswith(magic):
            raise ShardError(f'shard {tar_path} is {name}-compressed; samples are read by offset, so shards must be '
                             'uncompressed .tar files: decompress it')


def add_member(entries, member, tar_path):
    key, ext = split_name(member.name)
    if key is None:
        return
    if not entries or entries[-1].key != key:
        entries.append(SampleIndex(key, {}))
    elif ext in entries[-1].members:
        raise ShardError(f'shard {tar_path} holds {member.name} twice in sample {key}; {REMEDY}')
    entries[-1].members[ext] = (member.offset_data, member.size)


def check_end(tar_path, end, size, entries):
    """tarfile stops without a word at a missing or broken header: a complete tar ends with a zero block."""
    with open(tar_path, 'rb') as f:
        f.seek(end)
        block = f.read(BLOCK)
    if len(block) < BLOCK:
        raise ShardError(f'shard {tar_path} is truncated after {last_sample(entries)} ({size} bytes, no end-of-archive '
                         f'block); {REMEDY}')
    if block.count(0) != BLOCK:
        raise ShardError(f'shard {tar_path} has a corrupt tar header at byte {end}, after {last_sample(entries)}; '
                         f'{REMEDY}')


def read_member(f, offset, size):
    """The `size` bytes at `offset` of the open binary file f; ShardError when the file ends before."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ShardError(f'shard {getattr(f, "name", "")} is truncated: {len(data)} of {size} bytes at offset '
                         f'{offset}; {REMEDY}')
    return data


# ---------------------------------------------------------------- what training needs of a sample

IMAGE_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'GIF8', b'BM', b'II*\x00', b'MM\x00*',
               b'P1', b'P2', b'P3', b'P4', b'P5', b'P6')


def looks_like_an_image(head):
    """Whether the first bytes of a member are those of an image file (JPEG, PNG, WebP, GIF, BMP, TIFF, PNM)."""
    return head.startswith(IMAGE_MAGIC) or (head[:4] == b'RIFF' and head[8:12] == b'WEBP')


def sample_problems(path, entries):
    """One line per sample of a shard that training could not read: no image member, no .cls label, or an image
    member that is not an image."""
    problems = []
    with open(path, 'rb') as f:
        for entry in entries:
            problem = sample_problem(f, entry)
            if problem:
                problems.append(f'shard {path}: sample {entry.key} {problem}')
    return problems


def sample_problem(f, entry):
    """What is wrong with one sample, or ''."""
    images = [ext for ext in entry.members if ext.lower() in IMAGE_EXTS]
    if not images:
        return f'has no image member (it has {", ".join("." + ext for ext in entry.members)})'
    if 'cls' not in entry.members:
        return 'has no .cls label member'
    label = read_member(f, *entry.members['cls'])
    if not label.strip().isdigit():
        return f'has a .cls label that is not a class index ({label[:20]!r})'
    head = read_member(f, entry.members[images[0]][0], min(16, entry.members[images[0]][1]))
    if not looks_like_an_image(head):
        return f'has a .{images[0]} member that is not an image (it starts with {head[:8]!r})'
    return ''


# ---------------------------------------------------------------- the index file (DALI's format)

def index_path(root, filename, cache_dir=None):
    """Where the index of shard `filename` (relative to root) lives: beside it, NAME.idx for NAME.tar, or under
    cache_dir with the same relative name."""
    stem = filename[:-len('.tar')] if filename.endswith('.tar') else filename
    return os.path.join(cache_dir or root, stem + '.idx')


def write_index(entries, idx_path):
    """Write entries as DALI's webdataset index, atomically."""
    lines = [f'{INDEX_VERSION} {len(entries)}']
    for entry in entries:
        fields = []
        for ext, (offset, size) in entry.members.items():
            name = f'{entry.key}.{ext}'
            if len(name.split()) != 1:
                raise ShardError(f'member name {name!r} holds white space, which the index format cannot hold; '
                                 'rename the member')
            fields.append(f'{ext} {offset} {size} {name}')
        lines.append(' '.join(fields))
    write_atomically(idx_path, ('\n'.join(lines) + '\n').encode('utf-8', 'surrogateescape'))


def read_index(idx_path):
    """The SampleIndex list in a DALI webdataset index file (version v1.2); ShardError for a broken one."""
    try:
        with open(idx_path, 'rb') as f:
            lines = f.read().decode('utf-8', 'surrogateescape').splitlines()
    except OSError as e:
        raise ShardError(f'cannot read index {idx_path} ({e.strerror})') from e
    count = index_header(lines[0] if lines else '', idx_path)
    if len(lines) - 1 != count:
        raise ShardError(f'index {idx_path} lists {len(lines) - 1} samples, but its first line says {count}; '
                         f'{REMAKE_INDEX}')
    return [parse_sample(line, idx_path, number) for number, line in enumerate(lines[1:], 2)]


REMAKE_INDEX = 'remove it and make it again with scripts/prepare_data.py --index'


def index_count(idx_path):
    """The number of samples an index file lists, from its first line alone."""
    try:
        with open(idx_path, 'rb') as f:
            first = f.readline().decode('ascii', 'replace')
    except OSError as e:
        raise ShardError(f'cannot read index {idx_path} ({e.strerror})') from e
    return index_header(first, idx_path)


def index_header(line, idx_path):
    fields = line.split()
    if len(fields) != 2 or fields[0] != INDEX_VERSION or not fields[1].isdigit():
        raise ShardError(f'index {idx_path} does not start with "{INDEX_VERSION} COUNT" (DALI\'s webdataset index, '
                         f'version {INDEX_VERSION}); {REMAKE_INDEX}')
    return int(fields[1])


def parse_sample(line, idx_path, number):
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ShardError(f'index {idx_path} line {number} is not "EXT OFFSET SIZE NAME" groups; {REMAKE_INDEX}')
    entry = SampleIndex(split_name(fields[3])[0], {})
    for ext, offset, size, name in zip(*[iter(fields)] * 4):
        if not member_entry_ok(entry, ext, offset, size, name):
            raise ShardError(f'index {idx_path} line {number} has a broken member entry "{ext} {offset} {size} '
                             f'{name}"; {REMAKE_INDEX}')
        entry.members[ext] = (int(offset), int(size))
    return entry


def member_entry_ok(entry, ext, offset, size, name):
    """Numbers, a data offset on a tar block, a name of this sample's key and this extension, not seen before."""
    return (offset.isdigit() and size.isdigit() and int(offset) % BLOCK == 0 and entry.key is not None
            and split_name(name) == (entry.key, ext) and ext not in entry.members)


# ---------------------------------------------------------------- the info file (timm's layout)

def load_info(root):
    """(the info dict, its path) of root; (None, None) when root has no info file."""
    for name in INFO_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    info = json.load(f)
            except (OSError, ValueError) as e:
                raise ShardError(f'{path} cannot be read ({type(e).__name__}); remove it and run '
                                 f'{index_command(root)} to write it again') from e
            if not isinstance(info, dict) or not isinstance(info.get('splits'), dict):
                raise ShardError(f'{path} has no "splits" table (timm\'s layout); remove it and run '
                                 f'{index_command(root)} to write it again')
            return info, path
    return None, None


def load_split_info(root, split, cache_dir=None):
    """The shards of a split of root: a split name listed in root's _info.json, or a brace pattern of shard names
    (`train-{0000..0003}.tar`), whose counts come from the info file when it lists those shards, else from their
    index files (looked for beside them, or in cache_dir)."""
    info, info_path = load_info(root)
    if is_pattern(split):
        return pattern_split(root, split, info, cache_dir)
    if info is None:
        raise ShardError(f'{root} has no _info.json listing its shards; run {index_command(root)} once to index them '
                         'and write it')
    if split not in info['splits']:
        raise ShardError(f'{info_path} has no split {split!r} (it has: {", ".join(info["splits"]) or "none"}); pass '
                         'one of those')
    filenames, lengths = split_table(info['splits'][split], info_path, split)
    check_shards_exist(root, filenames, info_path)
    return SplitInfo(split, tuple(filenames), tuple(lengths), sum(lengths))


def is_pattern(split):
    return '{' in split or split.endswith('.tar')


def split_table(table, info_path, split):
    """(filenames, shard lengths) of one split's entry in an info file."""
    table = table if isinstance(table, dict) else {}
    filenames, lengths = table.get('filenames'), table.get('shard_lengths')
    if not (isinstance(filenames, list) and isinstance(lengths, list) and filenames
            and len(filenames) == len(lengths) and all(isinstance(n, str) for n in filenames)
            and all(isinstance(n, int) and n >= 0 for n in lengths)):
        raise ShardError(f'split {split!r} of {info_path} does not list "filenames" and as many "shard_lengths"; '
                         f'remove the file and run {index_command(os.path.dirname(info_path))} to write it again')
    return filenames, lengths


def check_shards_exist(root, filenames, source):
    for name in filenames:
        if not os.path.isfile(os.path.join(root, name)):
            raise ShardError(f'shard {os.path.join(root, name)} (listed in {source}) is missing; download it, or pass '
                             'the folder that holds it')


def pattern_split(root, pattern, info, cache_dir):
    filenames = expand_braces(pattern)
    check_shards_exist(root, filenames, f'the pattern {pattern}')
    counts, names = {}, {}
    for name, table in (info or {}).get('splits', {}).items():
        if isinstance(table, dict):
            for filename, length in zip(table.get('filenames') or (), table.get('shard_lengths') or ()):
                counts[filename], names[filename] = length, name
    if all(name in counts for name in filenames):
        lengths = [counts[name] for name in filenames]
        found = {names[name] for name in filenames}
        split = found.pop() if len(found) == 1 else pattern
    else:
        lengths, split = [counted(root, name, cache_dir) for name in filenames], pattern
    return SplitInfo(split, tuple(filenames), tuple(lengths), sum(lengths))


def counted(root, filename, cache_dir):
    path = index_path(root, filename, cache_dir)
    if not os.path.isfile(path):
        raise ShardError(f'shard {os.path.join(root, filename)} has no index {path} and no count in an _info.json; '
                         f'run {index_command(root)}' + (f' --cache-dir {cache_dir}' if cache_dir else '')
                         + ' once')
    return index_count(path)


def expand_braces(pattern):
    """The names a brace pattern stands for, as webdataset expands them: `{0000..0003}` (zero-padded to the width
    of the first number) and `{a,b}`, any number of them."""
    match = re.search(r'\{([^{}]*)\}', pattern)
    if not match:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r'(\d+)\.\.(\d+)', body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise ShardError(f'the shard pattern {pattern} counts down ({body}); write it as {{{last}..{first}}}')
        choices = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        choices = body.split(',')
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def group_splits(counts):
    """{split: [(filename, count)]} from shard names such as imagenet1k-train-0000.tar or train-000000.tar: the word
    before the number names the split (the whole prefix where two prefixes end in the same word)."""
    groups = {}
    for filename in sorted(counts, key=lambda name: [int(part) if part.isdigit() else part
                                                     for part in re.split(r'(\d+)', name)]):
        match = re.fullmatch(r'(.*?)[-_]?\d+\.tar', filename)
        prefix = match.group(1) if match and match.group(1) else filename[:-len('.tar')]
        groups.setdefault(prefix, []).append((filename, counts[filename]))
    words = {prefix: re.split(r'[-_]', prefix)[-1] or prefix for prefix in groups}
    shared = {word for word in words.values() if list(words.values()).count(word) > 1}
    return {(prefix if words[prefix] in shared else words[prefix]): files for prefix, files in groups.items()}


def write_info(dst, splits):
    """Write dst/_info.json in timm's layout for splits {split: [(filename, count)]}, keeping the other splits of
    an existing one."""
    path = os.path.join(dst, INFO_FILES[0])
    info = load_info(dst)[0] if os.path.isfile(path) else None
    info = info or {'splits': {}}
    for split, written in splits.items():
        info['splits'][split] = {'name': split, 'num_samples': sum(count for _, count in written),
                                 'filenames': [name for name, _ in written],
                                 'shard_lengths': [count for _, count in written]}
    write_atomically(path, (json.dumps(info, indent=1) + '\n').encode())


# ---------------------------------------------------------------- writing shards

def shard_name(split, number):
    return f'{split}-{number:06d}.tar'


def write_shards(samples, dst, split, shard_size):
    """Write samples, an iterable of (key, {ext: bytes}), as dst/SPLIT-000000.tar, ... of at most shard_size samples
    each, with their index files; returns [(filename, count)]. The same samples give byte-identical shards."""
    samples, written = iter(samples), []
    os.makedirs(dst, exist_ok=True)
    for number in itertools.count():
        first = next(samples, None)
        if first is None:
            return written
        filename = shard_name(split, number)
        entries = write_shard(os.path.join(dst, filename), itertools.chain([first],
                                                                         itertools.islice(samples, shard_size - 1)))
        written.append((filename, len(entries)))


def write_shard(path, samples):
    """Write one shard and its index from (key, {ext: bytes}), members in sorted order with fixed headers. The tar
    is read back through index_shard and read_member and compared with what was written before it is renamed into
    place, its index first. Returns its SampleIndex list."""
    tmp = temporary_name(path)
    try:
        with open(tmp, 'wb') as f:
            digests = write_tar(f, samples)
            f.flush()
            os.fsync(f.fileno())
        entries = index_shard(tmp)
        check_written(tmp, entries, digests, path)
        write_index(entries, index_path(os.path.dirname(path), os.path.basename(path)))
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return entries


def write_tar(f, samples):
    """Write samples as a tar into f; returns [(key, {ext: digest})] of what was written."""
    digests = []
    with tarfile.open(fileobj=f, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            check_key(key, members)
            for ext in sorted(members):
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size, info.mtime, info.mode, info.uid, info.gid = len(members[ext]), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(members[ext]))
            digests.append((key, {ext: digest(data) for ext, data in members.items()}))
    return digests


def digest(data):
    return hashlib.blake2b(data, digest_size=16).digest()


def check_key(key, members):
    """A key with a dot in its last part, or white space, would be read back as another key."""
    if not key or split_name(f'{key}.x') != (key, 'x') or len(key.split()) != 1 or not members or any(
            not ext or '/' in ext or len(ext.split()) != 1 for ext in members):
        raise ValueError(f'sample key {key!r} with members {sorted(members)} cannot be written: keys and extensions '
                         'need no white space, and no dot after the last "/" of a key')


def check_written(tmp, entries, digests, path):
    read_back = [(entry.key, set(entry.members)) for entry in entries]
    if read_back != [(key, set(members)) for key, members in digests]:
        raise ShardError(f'shard {path} reads back with other samples than were written; write it again')
    with open(tmp, 'rb') as f:
        for entry, (_, members) in zip(entries, digests):
            for ext, (offset, size) in entry.members.items():
                if digest(read_member(f, offset, size)) != members[ext]:
                    raise ShardError(f'shard {path} reads back sample {entry.key} ({ext}) with other bytes than '
                                     'were written; check the disk and write it again')


# ---------------------------------------------------------------- files

def temporary_name(path):
    return f'{path}.{os.getpid()}.tmp'


def write_atomically(path, data):
    """path holds all of data or what it held before: written under a temporary name, synced, renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass
