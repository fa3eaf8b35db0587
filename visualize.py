"""Pictures: EViT keep masks, attention maps over an image, predictions, and training curves from log.txt.

Figures are drawn with matplotlib's Agg renderer (matplotlib.figure.Figure, no pyplot), so no display is needed.
matplotlib is imported only when a picture is drawn: main.py imports this module on every run.

    paths = save_keep_masks(model, dataset_val, 'runs/evit', n_images=16, device=torch.device('cpu'))
"""
import math
import os

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import utils

DROPPED_FILL = (0.55, 0.7, 0.9)  # RGB over the patches a keep layer dropped: pale blue, unlike any digit stroke
PANEL_INCHES = 2.2


def _new_figure(width, height):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def denormalize(image, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """A normalized (3, H, W) tensor back to an (H, W, 3) float array in [0, 1] for drawing."""
    mean = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _show_image(ax, image, title):
    """Small images stay pixel-sharp; large ones are smoothed."""
    ax.imshow(image, interpolation='nearest' if max(image.shape[:2]) < 64 else 'antialiased')
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


# ---------------------------------------------------------------- EViT keep masks

def keep_masks(kept_indices, num_patches):
    """EViT's kept_indices (per keep layer a (B, k) tensor of patch-grid positions, -1 the fused token) ->
    bool (B, L, num_patches): True where the patch is still a token of its own after keep layer l."""
    batch = kept_indices[0].shape[0]
    masks = torch.zeros(batch, len(kept_indices), num_patches + 1, dtype=torch.bool)  # last column: the -1s
    for layer, kept in enumerate(kept_indices):
        slots = torch.where(kept < 0, num_patches, kept).cpu()
        masks[:, layer].scatter_(1, slots, True)
    return masks[..., :num_patches]


def masked_image(image, keep, fill=DROPPED_FILL):
    """Paint over the dropped patches: image (H, W, 3), keep bool (h, w) on the patch grid -> (H, W, 3)."""
    keep = np.asarray(keep, dtype=bool)
    patch_h, patch_w = image.shape[0] // keep.shape[0], image.shape[1] // keep.shape[1]
    pixel_keep = keep.repeat(patch_h, axis=0).repeat(patch_w, axis=1)  # (H, W) when the grid tiles the image
    return np.where(pixel_keep[..., None], image, np.asarray(fill, dtype=image.dtype))


def draw_keep_mask_picture(image, layer_keeps, titles, path):
    """One row: the image, then the image with each keep layer's dropped patches painted over; a title each."""
    fig = _new_figure(PANEL_INCHES * (1 + len(layer_keeps)), PANEL_INCHES + 0.3)
    axes = fig.subplots(1, 1 + len(layer_keeps), squeeze=False)[0]
    for ax, picture, title in zip(axes, [image] + [masked_image(image, keep) for keep in layer_keeps], titles):
        _show_image(ax, picture, title)
    fig.savefig(path, dpi=80, bbox_inches='tight', pad_inches=0.05)


@torch.no_grad()
def save_keep_masks(model, dataset, output_dir, n_images, device, class_names=None, batch_size=64,
                    mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Run the first n_images of dataset through an EViT model and draw which patches each keep layer kept.

    Writes output_dir/masks/NNNN.png (rank 0 only) and returns their paths. The model's train / eval mode and
    record_keep setting are restored afterwards.
    """
    if not hasattr(model, 'record_keep'):
        raise utils.UserError(f'--visualize_mask draws EViT keep masks; {type(model).__name__} is not an EViT '
                              'model: drop the flag or train an evit_* model')
    if not output_dir:
        raise utils.UserError('--visualize_mask writes pictures to output_dir/masks; pass --output_dir')
    if not model.drop_loc:
        raise utils.UserError('--visualize_mask: this EViT has no keep layers (empty --drop_loc); nothing to draw')
    if not utils.is_main_process():
        return []
    folder = os.path.join(output_dir, 'masks')
    os.makedirs(folder, exist_ok=True)
    was_training, was_recording = model.training, model.record_keep
    model.eval()
    model.record_keep = True
    paths = []
    try:
        for start in range(0, min(n_images, len(dataset)), batch_size):
            indices = range(start, min(start + batch_size, n_images, len(dataset)))
            paths += _draw_keep_batch(model, dataset, indices, folder, device, class_names, (mean, std))
    finally:
        model.train(was_training)
        model.record_keep = was_recording
    print(f'| wrote {len(paths)} keep-mask pictures to {folder}', flush=True)
    return paths


def _draw_keep_batch(model, dataset, indices, folder, device, class_names, normalization):
    images, targets = zip(*(dataset[i] for i in indices))
    x = torch.stack(images).to(device)  # (B, 3, H, W)
    predictions = model(x).argmax(dim=1).tolist()
    patch_h, patch_w = model.patch_embed.patch_size
    grid_h, grid_w = x.shape[2] // patch_h, x.shape[3] // patch_w
    masks = keep_masks(model.kept_indices, grid_h * grid_w)  # (B, L, h * w)
    name = (lambda c: class_names[c]) if class_names else str
    paths = []
    for row, index in enumerate(indices):
        layer_keeps = [m.view(grid_h, grid_w).numpy() for m in masks[row]]
        titles = [f'label {name(int(targets[row]))}, predicted {name(predictions[row])}']
        for block, keep, kept in zip(model.drop_loc, layer_keeps, model.kept_indices):
            fused = ' + fused' if (kept[row] < 0).any() else ''
            titles.append(f'block {block}: {int(keep.sum())}/{keep.size} kept{fused}')
        path = os.path.join(folder, f'{index:04d}.png')
        draw_keep_mask_picture(denormalize(images[row], *normalization), layer_keeps, titles, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- grids: attention maps, predictions

def _panel_grid(count, columns, title_lines=1):
    """A figure with count image panels, columns per row; the unused axes are hidden."""
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    fig = _new_figure(PANEL_INCHES * columns, (PANEL_INCHES + 0.15 * title_lines) * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes[:count]


def draw_attention_grid(image, maps, path, columns=4):
    """The image, then each (title, (h, w) map) overlaid on it as a heat map; written as one PNG grid."""
    panels = [('input', None)] + list(maps)
    fig, axes = _panel_grid(len(panels), columns)
    for ax, (title, heat) in zip(axes, panels):
        _show_image(ax, image, title)
        if heat is not None:
            ax.imshow(_upsample(_unit_range(heat), image.shape[:2]), cmap='jet', alpha=0.5,
                      interpolation='nearest')
    fig.savefig(path, dpi=100, bbox_inches='tight', pad_inches=0.05)


def draw_predictions(images, captions, path, columns=4):
    """A grid of (H, W, 3) images, each under its caption (one line per predicted class)."""
    lines = max(caption.count('\n') + 1 for caption in captions)
    fig, axes = _panel_grid(len(images), columns, title_lines=lines)
    for ax, image, caption in zip(axes, images, captions):
        _show_image(ax, image, caption)
    fig.savefig(path, dpi=100, bbox_inches='tight', pad_inches=0.05)


def _upsample(heat, size):
    """A (h, w) patch-grid map resampled bilinearly to the image's (H, W) pixels."""
    heat = torch.as_tensor(heat, dtype=torch.float32)[None, None]  # (1, 1, h, w)
    return torch.nn.functional.interpolate(heat, size=tuple(size), mode='bilinear', align_corners=False)[0, 0].numpy()


def _unit_range(heat):
    heat = np.asarray(heat, dtype=np.float64)
    span = heat.max() - heat.min()
    return (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)


# ---------------------------------------------------------------- training curves

HISTORY_PANELS = (('loss', ('train_loss', 'test_loss')), ('top-1 accuracy (%)', ('test_acc1',)),
                  ('learning rate', ('train_lr',)))
HISTORY_FIGSIZE = (15, 4)  # inches
HISTORY_DPI = 100


def draw_history(runs, path):
    """runs: {label: [epoch dicts from log.txt]} -> one row of loss, accuracy and LR curves per epoch."""
    from matplotlib.ticker import MaxNLocator
    fig = _new_figure(*HISTORY_FIGSIZE)
    axes = fig.subplots(1, len(HISTORY_PANELS))
    colors = [f'C{i % 10}' for i in range(len(runs))]
    for ax, (ylabel, keys) in zip(axes, HISTORY_PANELS):
        for color, (label, epochs) in zip(colors, runs.items()):
            x = [e['epoch'] for e in epochs]
            for key, style in zip(keys, ('-', '--')):
                points = [(xi, e[key]) for xi, e in zip(x, epochs) if e.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, label=f'{label} {key}', marker='.')
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_yscale('log')
    fig.tight_layout()
    fig.savefig(path, dpi=HISTORY_DPI)
