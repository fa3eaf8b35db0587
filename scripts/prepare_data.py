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
"""
import argparse
import contextlib
import errno
import io
import json
import os
import signal
import sys
import time
from multiprocessing import Pool

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # importing torch takes seconds: a Ctrl-C meanwhile gets one line too
    import utils  # noqa: E402
    from datasets import IMG_EXTENSIONS  # noqa: E402
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


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='the data set folder (train/ and val/ with class folders, or any folder of images)')
    p.add_argument('dst', nargs='?', default='', help='where to write the checked (and resized) copy')
    p.add_argument('--max-side', type=int, default=0, metavar='N', help='shrink the copy to at most N px per side')
    p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes decoding in parallel')
    p.add_argument('--skip-bad-images', action='store_true',
                   help='leave unreadable images out (listed in DST/not_copied.txt) and exit 0')
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
        self.done += 1
        self.unreadable += outcome not in (WRITTEN, PRESENT)
        if self.done % 500 == 0 or self.done == self.total:
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
        if workers == 1:
            return collect(map(prepare_one, jobs), meter)
        with start_pool(workers) as pool:
            outcomes = collect(pool.imap_unordered(prepare_one, jobs, chunksize=16), meter)
            pool.close()
            pool.join()
            return outcomes
    finally:
        meter.close()


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


def describe(options):
    return f'of {options["source"]} with --max-side {options["max_side"]} (JPEG quality {options["jpeg_quality"]})'


def read_marker(dst, options):
    """The marker of a copy this script started in dst with the same options; None when dst is new or empty.
    UserError for any other dst."""
    path = os.path.join(dst, MARKER)
    if not os.path.isfile(path):
        if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
            raise UserError(f'{dst} exists and is not an empty folder, nor a copy started by prepare_data.py; '
                            'pass a new DST')
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path} cannot be read ({type(e).__name__}); pass a new DST') from e
    if not isinstance(marker, dict) or marker.get('made_by') != MADE_BY or marker.get('format') != MARKER_FORMAT \
            or not isinstance(marker.get('options'), dict) or set(marker['options']) != set(options):
        raise UserError(f'{path} was not written by this version of prepare_data.py; pass a new DST')
    if marker['options'] != options:
        raise UserError(f'{dst} is a copy {describe(marker["options"])}; run with those options to complete it, '
                        'or pass a new DST')
    return marker


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


def write_failure(error, dst):
    """The one line for an OSError, which only writing the copy raises."""
    where = (error.filename or dst or '').removesuffix(TMP_SUFFIX)
    reason = f'{where}: {error.strerror}' if error.strerror and where else str(error)
    if not dst:
        return reason
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f'cannot write to {dst} ({reason}); make it writable or pass another DST'
    full = 'no space left for the copy' if error.errno in (errno.ENOSPC, errno.EDQUOT) else 'cannot write the copy'
    return f'{full} ({reason}): {dst} is unfinished; free space or fix that, then run the same command again to ' \
           'complete it'


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        return prepare(args)
    except UserError as e:
        utils.exit_with_error(e)
    except OSError as e:
        utils.exit_with_error(write_failure(e, args.dst))
    except KeyboardInterrupt:
        unfinished = f'the copy in {args.dst} is unfinished' if args.dst else 'not every image was checked'
        print(f'interrupted: {unfinished}; run the same command again to complete it', file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)


if __name__ == '__main__':
    sys.exit(main())
