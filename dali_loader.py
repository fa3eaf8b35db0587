"""--data-backend dali: NVIDIA DALI decodes and augments the images of folder and list data sets, on the GPU (nvJPEG,
the hardware JPEG decoder where the GPU has one) or, without one, in DALI's CPU mode.

Batches come in the order of the pil backend's samplers (DeiT's repeated augmentation, sharded by rank, exact
evaluation shards), as uint8 (B, 3, H, W) images that loaders.DeviceFinish normalises and erases; Mixup / CutMix
follow in the train loop, as for the pil backend. A loader builds its pipeline once (one per multi-size stage,
one per evaluation size) and feeds it each pass's order, so a new epoch or a mid-epoch resume starts at once.
What DALI draws (crops, flips, RandAugment) follows DALI's RNG, seeded from the first pass's first sample seed:
the images and their order are the pil backend's, their augmentations are not. Which files are used is the pil
backend's verdict too (CheckedSamples).
"""
import collections
import importlib
import io
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import utils
from datasets import auto_augment_policy, preprocessing
from images import BadImageError, load_rgb
from samplers import first_readable
from utils import UserError

DATA_SETS = ('IMNET', 'FOLDER', 'LIST', 'INAT18', 'INAT19', 'WDS')  # data sets of encoded image files
INTERPOLATIONS = {'bicubic': 'INTERP_CUBIC', 'bilinear': 'INTERP_LINEAR', 'nearest': 'INTERP_NN'}
RAND_AUGMENT = re.compile(r'rand(-[a-z]+\d*(\.\d+)?)*$')


def dali_wheel():
    """The DALI wheel built for this torch's CUDA major version."""
    return f'nvidia-dali-cuda{(torch.version.cuda or "12").split(".")[0]}0'


def require_dali():
    try:
        importlib.import_module('nvidia.dali')
    except ImportError as e:
        raise UserError(f'--data-backend dali needs NVIDIA DALI, which is not installed; pip install {dali_wheel()} '
                        '(the wheel for this torch\'s CUDA), or use --data-backend pil') from e


def check_flags(args):
    """A one-line error for what the DALI pipeline does not do, before anything is built."""
    require_dali()
    aa = auto_augment_policy(args)
    unsupported = [
        (args.data_set not in DATA_SETS, f'--data-set {args.data_set} (DALI reads image files: '
                                         f'{", ".join(DATA_SETS)})'),
        (args.use_lmdb, '--use-lmdb (DALI has no reader for this LMDB layout)'),
        (args.ThreeAugment, '--ThreeAugment (a pil-backend pipeline)'),
        (args.train_interpolation not in INTERPOLATIONS, f'--train-interpolation {args.train_interpolation} '
                                                         f'(DALI: {", ".join(INTERPOLATIONS)})'),
        (aa is not None and not RAND_AUGMENT.match(aa), f'--aa {args.aa} (DALI has RandAugment, rand-mM-nN, '
                                                         'only)'),
        (aa is not None and RAND_AUGMENT.match(aa) and magnitude_bound(aa) > 10,
         f'--aa {args.aa} (magnitudes above 10: DALI\'s op ranges end at timm\'s magnitude 10)'),
    ]
    for problem, what in unsupported:
        if problem:
            raise UserError(f'--data-backend dali does not support {what}; use --data-backend pil')


def rand_augment_n_m(aa):
    """(number of ops, magnitude out of 10) from timm's 'rand-m9-mstd0.5-inc1' (n defaults to 2, m to 10). timm
    clips the magnitude to 10 unless `mmax` raises the bound, which check_flags refuses for DALI."""
    options = dict(re.findall(r'-([a-z]+)(\d+(?:\.\d+)?)', aa))
    return int(options.get('n', 2)), min(max(float(options.get('m', 10)), 0.0), 10.0)


def magnitude_bound(aa):
    """timm's `mmax` of a RandAugment policy (10 when not given)."""
    found = re.search(r'-mmax(\d+(?:\.\d+)?)', aa)
    return float(found.group(1)) if found else 10.0


def timm_rand_augment_ops():
    """timm's RandAugment ('inc1' ops, magnitude ranges of timm) in DALI's terms. timm applies each op it picks
    with probability 0.5, and DALI applies every op it picks: beside each op an identity, so that a pick is an
    identity half of the time."""
    from nvidia.dali.auto_aug import augmentations as a
    equalize, sharpness = current_dali_ops()
    ops = [a.auto_contrast, equalize, a.invert, a.rotate.augmentation((0, 30), True),
           a.posterize.augmentation((4, 0), False, a.poster_mask_uint8),  # 4 bits kept down to 0 (DALI keeps 1)
           a.solarize.augmentation((256, 0)), a.solarize_add.augmentation((0, 110)),
           a.color.augmentation((0, 0.9), True, a.shift_enhance_range),
           a.contrast.augmentation((0, 0.9), True, a.shift_enhance_range),
           a.brightness.augmentation((0, 0.9), True, a.shift_enhance_range),
           sharpness,
           a.shear_x.augmentation((0, 0.3), True), a.shear_y.augmentation((0, 0.3), True),
           a.translate_x.augmentation((0, 0.45), True), a.translate_y.augmentation((0, 0.45), True)]
    return ops + [a.identity] * len(ops)


def current_dali_ops():
    """DALI's equalize and sharpness augmentations, written with the ops' current names (DALI's own still call
    fn.experimental.equalize and fn.experimental.filter, which warn on every pipeline build)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=a.sharpness_kernel, param_device='auto')
    def sharpness(data, kernel):
        return fn.filter(data, kernel)
    return equalize, sharpness


class DaliLoader:
    """A DataLoader look-alike: len() batches of (uint8 images, int64 labels) in the order of `sampler`, through one
    DALI pipeline built at the first pass and fed every later pass's order (a new epoch, a mid-epoch resume), so an
    epoch starts without a rebuild. `sampler.set_epoch` works as for the pil backend's loaders. The files of the
    next batches are read (and judged by pil, see CheckedSamples) by `num_threads` threads while DALI decodes the
    ones before. With --skip-bad-images a training batch carries a third tensor, the samples passed over for each
    image, as the pil backend's; an evaluation batch whose images were all unreadable is None."""

    PREFETCH = 2  # batches in DALI's queue ahead of the one handed over

    def __init__(self, samples, sampler, batch_size, pipeline, drop_last, device, num_threads):
        self.samples, self.sampler, self.batch_size, self.pipeline = samples, sampler, batch_size, pipeline
        self.drop_last, self.device, self.num_threads = drop_last, torch.device(device), max(num_threads, 1)
        self.pipe, self.builds, self.seed = None, 0, 0

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        if len(self) == 0:
            return
        order = list(self.sampler)
        indices = [item[0] if isinstance(item, tuple) else item for item in order]
        if self.pipe is None and self.builds == 0:
            self.seed = order[0][1] % 2 ** 31 if isinstance(order[0], tuple) else 0
        batches = [indices[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]
        self.handed = 0
        while self.handed < len(batches):
            if self.pipe is None:
                self._build()
            try:
                yield from self._pass(batches[self.handed:])
            except _DaliFailure as failure:
                self.samples.repair(failure.indices, self._decodes_alone(), failure.error)

    def _pass(self, batches):
        """The batches, through the pipeline; a failed DALI run ends the pass with _DaliFailure naming the samples
        DALI held (the pipeline is then unusable)."""
        reads = _BatchReads(self.samples, batches, self.num_threads, ahead=self.PREFETCH + 2)
        held = collections.deque()  # (sample indices, passed over) of each batch fed to DALI, oldest first
        try:
            self._start([reads.next() for _ in range(min(self.PREFETCH, len(batches)))], held)
            for k in range(len(batches)):
                try:
                    images, labels = self.pipe.outputs()
                except RuntimeError as e:
                    self.pipe = None  # DALI: "Current pipeline object is no longer valid"
                    raise _DaliFailure([i for indices, _ in held for i in indices], e) from e
                _, skipped = held.popleft()
                if k + self.PREFETCH < len(batches):
                    self._schedule(reads.next(), held)
                batch = self._batch(images, labels, skipped)
                self.handed += 1
                yield batch
        finally:  # also when the consumer stops early: the next pass must not get this one's batches
            self._drain(held)
            reads.close()

    def _batch(self, images, labels, skipped):
        if len(images) == 0:
            return None  # evaluation under --skip-bad-images: every image of the batch was unreadable
        batch = (_to_torch(images, torch.uint8, self.device),
                 _to_torch(labels, torch.int32, self.device).view(-1).long())
        return batch + (torch.tensor(skipped),) if self.samples.refill else batch

    def _drain(self, held):
        try:
            for _ in range(len(held) if self.pipe is not None else 0):
                self.pipe.outputs()
        except RuntimeError:
            self.pipe = None  # rebuilt by the next pass

    def _start(self, reads, held):
        """Feed and schedule the first batches. A new pipeline's first schedule_run runs PREFETCH iterations, so a
        pass shorter than that repeats its last batch (drained at the end)."""
        if not self.first_pass:
            for read in reads:
                self._schedule(read, held)
            return
        self.first_pass = False
        for read in reads + reads[-1:] * (self.PREFETCH - len(reads)):
            self._feed(read, held)
        self.pipe.schedule_run()

    def _schedule(self, read, held):
        self._feed(read, held)
        self.pipe.schedule_run()

    def _feed(self, read, held):
        files, labels, indices, skipped = read
        self.pipe.feed_input('encoded', files)
        self.pipe.feed_input('labels', labels)
        held.append((indices, skipped))

    def _new_pipeline(self, batch_size, prefetch):
        on_gpu = self.device.type == 'cuda'
        pipe = self.pipeline(on_gpu=on_gpu, batch_size=batch_size, num_threads=self.num_threads, seed=self.seed,
                             device_id=self._device_id() if on_gpu else None, prefetch_queue_depth=prefetch)
        pipe.build()
        return pipe

    def _build(self):
        self.pipe = self._new_pipeline(self.batch_size, self.PREFETCH)
        self.builds, self.first_pass = self.builds + 1, True

    def _decodes_alone(self):
        """data -> whether this loader's pipeline, built for one sample, takes that one encoded file."""
        probe = None

        def decodes(data):
            nonlocal probe
            if probe is None:
                probe = self._new_pipeline(batch_size=1, prefetch=1)
            probe.feed_input('encoded', [data])
            probe.feed_input('labels', [np.zeros(1, dtype=np.int32)])
            try:
                probe.run()
                return True
            except RuntimeError:
                probe = None  # unusable after a failure
                return False
        return decodes

    def _device_id(self):
        """--device cuda:N, else the device torchrun / Slurm set for this rank."""
        return self.device.index if self.device.index is not None else torch.cuda.current_device()


class _DaliFailure(Exception):
    def __init__(self, indices, error):
        super().__init__(str(error))
        self.indices, self.error = indices, error


class CheckedSamples:
    """The encoded samples of a data set under one rule for both backends: a file is used when the pil decoder
    reads it. Each file is decoded once by pil, the first time this process reads it (not in a set written by
    scripts/prepare_data.py, which decoded every file already). A file pil refuses stops the run with the pil
    backend's error, or under --skip-bad-images is passed over as the pil backend does: a training sample by the
    next readable one of the data set, an evaluation sample left out. A file pil reads but DALI cannot decode is
    fed to DALI from then on as a lossless PNG of pil's decode, with a note."""

    UNKNOWN, GOOD, BAD = 0, 1, 2

    def __init__(self, encoded, verdicts, skip=False, refill=False):
        self.encoded, self.skip, self.refill = encoded, skip, refill and skip
        self.verdicts = verdicts  # shared by every loader of the data set: (state per sample, PNG substitutes)

    def read(self, index):
        """(encoded file, label, index read, samples passed over) for sample `index`; None for an evaluation sample
        passed over."""
        skip = (BadImageError,) if self.skip else ()
        found = first_readable(self._read_judged, index, len(self.verdicts[0]), skip, self.refill)
        return None if found is None else (*found[0], found[1])

    def _read_judged(self, i):
        data, label, name = self.encoded(i)
        self._judge(i, name, data)
        return self.verdicts[1].get(i, data), label, i

    def _judge(self, i, name, data):
        state = self.verdicts[0]
        if state[i] == self.BAD:
            raise BadImageError(f'unreadable image {name}')
        if state[i] == self.UNKNOWN:
            try:
                load_rgb(name, data)
            except BadImageError:
                state[i] = self.BAD
                raise
            state[i] = self.GOOD

    def repair(self, indices, dali_decodes, error):
        """After DALI failed on a batch holding samples `indices`: each file DALI cannot decode alone is judged by
        pil (an unreadable image, as in read(), or a PNG substitute from then on). Raises when no file explains
        the failure."""
        state, substitutes = self.verdicts
        found, names = False, []
        for i in dict.fromkeys(indices):
            data, _, name = self.encoded(i)
            names.append(name)
            if i in substitutes or dali_decodes(data):
                continue
            found = True
            try:
                substitutes[i] = _png(load_rgb(name, data))
            except BadImageError:
                state[i] = self.BAD
                if not self.skip:
                    raise
            else:
                state[i] = self.GOOD
                utils.log(f'note: DALI cannot decode {name}, which pil reads; DALI is given pil\'s decode of it')
        if not found:
            shown = ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
            reason = str(error).strip().splitlines()[0][:200]
            raise UserError(f'DALI failed on the batches of {shown}, though it decodes each of them alone '
                            f'({reason}); run with --data-backend pil')


def checked_samples(dataset, data_path, skip, refill):
    """CheckedSamples of `dataset`, whose verdicts every loader of it (each multi-size stage) shares."""
    if not hasattr(dataset, 'pil_verdicts'):
        prepared = written_by_prepare_data(data_path)
        state = np.full(len(dataset), CheckedSamples.GOOD if prepared else CheckedSamples.UNKNOWN, dtype=np.int8)
        dataset.pil_verdicts = (state, {})
    return CheckedSamples(encoded_samples(dataset), dataset.pil_verdicts, skip, refill)


def written_by_prepare_data(root):
    """Whether `root` is a complete copy or shard set of scripts/prepare_data.py, every image of which pil read."""
    if not root:
        return False
    try:
        with open(os.path.join(root, 'prepare_data.json')) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get('made_by') == 'scripts/prepare_data.py' \
        and marker.get('complete') is True


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, 'PNG', compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def encoded_samples(dataset):
    """encoded(i) -> (the encoded image as uint8, label, its name for messages): a shard set's own reader, else the
    file of an image-file data set's (path, label) sample."""
    if hasattr(dataset, 'encoded'):
        def from_shards(i):
            data, label, name = dataset.encoded(i)
            return np.frombuffer(data, dtype=np.uint8), label, name
        return from_shards
    samples = dataset.samples

    def from_files(i):
        path, label = samples[i]
        return _read_file(str(path)), label, str(path)
    return from_files


class _BatchReads:
    """(encoded files, labels, sample indices, samples passed over) of each batch, in order, read by a thread pool at
    most `ahead` batches ahead."""

    def __init__(self, samples, batches, threads, ahead):
        self.samples, self.batches, self.ahead = samples, batches, ahead
        self.pool, self.pending, self.submitted = ThreadPoolExecutor(threads), [], 0

    def next(self):
        while self.submitted < len(self.batches) and len(self.pending) < self.ahead:
            self.pending.append([self.pool.submit(self.samples.read, i) for i in self.batches[self.submitted]])
            self.submitted += 1
        read = [r for r in (f.result() for f in self.pending.pop(0)) if r is not None]
        return ([data for data, _, _, _ in read], [np.array([label], dtype=np.int32) for _, label, _, _ in read],
                [i for _, _, i, _ in read], [skipped for _, _, _, skipped in read])

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _read_file(path):
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise BadImageError(f'unreadable image {path} ({e.strerror or e}); remove it or restore the file') from e


def _to_torch(outputs, dtype, device):
    """A copy of a DALI output batch as a torch tensor, on the GPU where DALI left it there."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    dense = outputs.as_tensor()
    on_gpu = type(outputs).__name__ == 'TensorListGPU'
    tensor = torch.empty(dense.shape(), dtype=dtype, device=device if on_gpu else 'cpu')
    feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream(device) if on_gpu else None)
    return tensor


def _encoded_input():
    from nvidia.dali import fn, types
    return (fn.external_source(name='encoded', dtype=types.UINT8, ndim=1),
            fn.external_source(name='labels', dtype=types.INT32, ndim=1))


def train_pipeline(args):
    """A function (files, labels, on_gpu, pipeline options) -> DALI pipeline of DeiT's training transform at
    args.input_size: random-resized crop (a padded random crop at 32 px and below, as in DeiT), flip, RandAugment
    with DeiT's n and m (or colour jitter without it), HWC -> CHW."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment
    size, aa = args.input_size, auto_augment_policy(args)
    interp = getattr(types, INTERPOLATIONS[args.train_interpolation])

    @pipeline_def(enable_conditionals=True)
    def pipeline(on_gpu):
        jpegs, targets = _encoded_input()
        decoder, op = ('mixed', 'gpu') if on_gpu else ('cpu', 'cpu')
        if size > 32:
            images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                                   adjust_orientation=False, random_area=(0.08, 1.0),
                                                   random_aspect_ratio=(3 / 4, 4 / 3), num_attempts=10)
            images = fn.resize(images, device=op, size=(size, size), interp_type=interp, antialias=True)
        else:
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, device=op, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True)
            pad = max(size // 8, 1)
            start = fn.random.uniform(range=(-pad, pad + 1), shape=(2,), dtype=types.INT32)
            images = fn.slice(images, start=start, shape=(size, size), axis_names='HW', out_of_bounds_policy='pad',
                              fill_values=0)
        images = fn.flip(images, device=op, horizontal=fn.random.coin_flip(probability=args.hflip))
        if aa is not None:
            n, m = rand_augment_n_m(aa)
            # 11 bins make bin m exactly timm's magnitude m / 10 of each op's range
            images = rand_augment.apply_rand_augment(timm_rand_augment_ops(), images, n=n, m=int(round(m)),
                                                     num_magnitude_bins=11, shape=(size, size), fill_value=128)
        elif args.color_jitter:
            jitter = (max(0.0, 1 - args.color_jitter), 1 + args.color_jitter)
            images = fn.color_twist(images, device=op, brightness=fn.random.uniform(range=jitter),
                                    contrast=fn.random.uniform(range=jitter),
                                    saturation=fn.random.uniform(range=jitter))
        images = fn.transpose(images, device=op, perm=[2, 0, 1])
        return images, targets.gpu() if on_gpu else targets

    return pipeline


def eval_pipeline(args):
    """DeiT's evaluation transform: resize (--interpolation) of the short side to size / --eval-crop-ratio and a
    center crop (a resize to size x size at 32 px and below), HWC -> CHW."""
    from nvidia.dali import fn, pipeline_def, types
    size = args.input_size

    @pipeline_def
    def pipeline(on_gpu):
        jpegs, targets = _encoded_input()
        decoder, op = ('mixed', 'gpu') if on_gpu else ('cpu', 'cpu')
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False)
        if size > 32:
            images = fn.resize(images, device=op, resize_shorter=int(size / preprocessing(args, 'eval_crop_ratio')),
                               interp_type=getattr(types, INTERPOLATIONS[preprocessing(args, 'interpolation')]),
                               antialias=True)
            images = fn.crop(images, device=op, crop=(size, size))
        else:
            images = fn.resize(images, device=op, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.transpose(images, device=op, perm=[2, 0, 1])
        return images, targets.gpu() if on_gpu else targets

    return pipeline


def build_train_loader(args, dataset, sampler, batch_size):
    """args: flags that check_flags has passed."""
    samples = checked_samples(dataset, args.data_path, args.skip_bad_images, refill=True)
    return DaliLoader(samples, sampler, batch_size, train_pipeline(args), drop_last=True,
                      device=args.device, num_threads=args.num_workers)


def build_val_loader(args, dataset, sampler, batch_size):
    """args: flags that check_flags has passed."""
    samples = checked_samples(dataset, args.data_path, args.skip_bad_images, refill=False)
    return DaliLoader(samples, sampler, batch_size, eval_pipeline(args), drop_last=False,
                      device=args.device, num_threads=args.num_workers)
