"""Where a ViT-family model looks: class-token attention maps over an image, written as one PNG grid.

    python scripts/visualize_attention.py --checkpoint runs/deit_s/best_checkpoint.pth cat.jpg -o attention.png
    python scripts/visualize_attention.py --model deit_small_patch16_224 --hub cat.jpg

Panels: the input, attention rollout through all blocks (Abnar & Zuidema, 2020: per block the head mean plus
the identity for the residual, rows renormalized, multiplied from the first block to the last), the last
block's class-token attention averaged over heads, then per head.

Forward hooks on each block's attention module recompute softmax(q k^T * scale) from its own qkv projection,
so fused-attention models run unchanged. Works for timm VisionTransformers, the small DeiTs, LocalViT, EViT
(dropped tokens get no attention; a fused token's share goes to the patches it merged) and DHVT (its head
tokens are left out and the rows renormalized).

PatchConvnet has no attention in its convolutional trunk: its panels are the aggregation layer's class attention
over the patches (for the multi-class-token S60_multi, the maps of the four top-scoring classes' tokens).
"""
import argparse
import math
import os
import sys

import torch
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402
import visualize  # noqa: E402
from datasets import load_rgb  # noqa: E402
from images import BadImageError  # noqa: E402
from predict import add_weight_flags, load_model, resolve_device, unreadable_reason  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('image', metavar='IMAGE')
    add_weight_flags(p)
    p.add_argument('-o', '--output', default='attention.png', metavar='FILE', help='the PNG to write (missing folders '
                   'are made; a file there is replaced, and the tool says so)')
    return p


# ---------------------------------------------------------------- capturing attention

def attention_modules(model):
    """Each block's attention module; ValueError for models without ViT-style blocks."""
    blocks = getattr(model, 'blocks', None)
    attns = [getattr(block, 'attn', None) for block in blocks or ()]
    if not attns or not all(hasattr(a, 'qkv') and hasattr(a, 'num_heads') for a in attns):
        raise ValueError(f'{type(model).__name__} has no blocks[i].attn with a qkv projection; '
                         'pass a ViT-family model (DeiT, ViT, LocalViT, EViT, DHVT)')
    return attns


def attention_probs(attn, x):
    """softmax(q k^T * scale) of an attention module on its input x (B, N, C): (B, heads, N, N)."""
    n = x.shape[1]
    if hasattr(attn, 'head_tokens'):  # DHVT: one extra token per head joins the attention
        x = torch.cat([x, attn.head_tokens(x)], dim=1)
    B, N, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
    q, k = getattr(attn, 'q_norm', torch.nn.Identity())(q), getattr(attn, 'k_norm', torch.nn.Identity())(k)
    scale = getattr(attn, 'scale', q.shape[-1] ** -0.5)
    probs = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    probs = probs[..., :n, :n]
    return probs / probs.sum(dim=-1, keepdim=True)


def token_selection(probs, kept, fused):
    """How an EViT keep layer maps its input tokens to its output tokens, for one image: (N_out, N_in).

    probs (heads, N_in, N_in) of that block; kept (k,) indices into its non-class tokens. Rows sum to 1: the
    class token and each kept token map to themselves, the fused token to the dropped tokens by their
    class-token attention (the weights EViT fuses them with).
    """
    n_in, k = probs.shape[-1], kept.shape[0]
    selection = probs.new_zeros(1 + k + int(fused), n_in)
    selection[0, 0] = 1
    selection[1 + torch.arange(k), 1 + kept] = 1
    if fused:
        weights = probs[:, 0, 1:].mean(dim=0).scatter(0, kept, 0.)  # (N_in - 1,), zero on the kept tokens
        selection[-1, 1:] = weights / weights.sum()
    return selection


@torch.no_grad()
def capture_attention(model, x):
    """Run one image x (1, 3, H, W); per block its attention (heads, N, N) and its token selection
    (N_out, N_in), or None where the tokens pass through unchanged."""
    attns = attention_modules(model)
    probs = [None] * len(attns)

    def keep_probs(index):
        def hook(module, inputs, output):
            probs[index] = attention_probs(module, inputs[0])[0]
        return hook

    handles = [a.register_forward_hook(keep_probs(i)) for i, a in enumerate(attns)]
    recording = getattr(model, 'record_keep', None)
    if recording is not None:
        model.record_keep = True  # EViT: blocks record which tokens they kept
    try:
        model.eval()(x)
        return probs, [_selection(block, p) for block, p in zip(model.blocks, probs)]
    finally:
        for handle in handles:
            handle.remove()
        if recording is not None:
            model.record_keep = recording


def _selection(block, probs):
    if not getattr(block, 'record', False) or getattr(block, 'recorded', None) is None:
        return None
    kept, fused = block.recorded
    return token_selection(probs, kept[0], fused)


# ---------------------------------------------------------------- maps

def attention_rollout(probs, selections):
    """(N_last, N_first): how much each token after the last block draws on each input token; rows sum to 1."""
    rollout = torch.eye(probs[0].shape[-1], device=probs[0].device)
    for attn, selection in zip(probs, selections):
        mixed = 0.5 * attn.mean(dim=0) + 0.5 * torch.eye(attn.shape[-1], device=attn.device)  # residual: half
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
        if selection is not None:
            rollout = selection @ rollout
    return rollout


def token_origins(selections):
    """(N_last_in, N_first): which input tokens each token entering the last block stands for."""
    origins = None
    for selection in selections[:-1]:
        if selection is not None:
            origins = selection if origins is None else selection @ origins
    return origins


def aggregation_maps(model, x, class_names=None):
    """PatchConvnet's class attention for one image x (1, 3, H, W): [(title, (h, w) map)]."""
    maps = model.eval().class_attention_map(x)[0]  # (class tokens, h, w)
    if maps.shape[0] == 1:
        return [('class attention', maps[0])]
    top = model(x)[0].topk(min(4, maps.shape[0])).indices.tolist()
    return [(f'{class_names[c] if class_names else c} token', maps[c]) for c in top]


def attention_maps(model, x):
    """For one image x (1, 3, H, W): ([(title, (h, w) map)], rollout matrix (N_last, N_first))."""
    probs, selections = capture_attention(model, x)
    prefix = getattr(model, 'num_prefix_tokens', 1)
    rollout = attention_rollout(probs, selections)
    cls_rows = probs[-1][:, 0]  # (heads, N_last_in): the last block's class-token attention
    origins = token_origins(selections)
    if origins is not None:
        cls_rows = cls_rows @ origins
    grid = _grid(probs[0].shape[-1] - prefix, x.shape[-2:])
    maps = [('rollout', rollout[0, prefix:].view(grid)),
            ('last block, head mean', cls_rows.mean(dim=0)[prefix:].view(grid))]
    maps += [(f'last block, head {h}', row[prefix:].view(grid)) for h, row in enumerate(cls_rows)]
    return maps, rollout


def _grid(num_patches, image_size):
    """The (h, w) patch grid of an image of image_size (H, W) cut into num_patches patches."""
    height, width = image_size
    h = round(math.sqrt(num_patches * height / width))
    if h * (num_patches // h) != num_patches:
        raise ValueError(f'{num_patches} patch tokens do not tile a {height}x{width} image; pass a model that '
                         'keeps one token per patch')
    return h, num_patches // h


def normalization(transform):
    """(mean, std) of the transform's Normalize step, to draw the model's input as an image."""
    for step in getattr(transform, 'transforms', ()):
        if isinstance(step, transforms.Normalize):
            return tuple(step.mean), tuple(step.std)
    return visualize.IMAGENET_DEFAULT_MEAN, visualize.IMAGENET_DEFAULT_STD


def read_image(path):
    try:
        return load_rgb(path)
    except BadImageError as e:
        raise ValueError(f'{unreadable_reason(e)}; pass an image file that opens') from e


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        replacing = utils.check_output_file(args.output, '-o')
        rgb = read_image(args.image)
        model, transform, class_names = load_model(args.checkpoint, args.model, args.hub, args.ema)
        x = transform(rgb).unsqueeze(0).to(device)  # (1, 3, H, W)
        model = model.to(device)
        if hasattr(model, 'class_attention_map'):
            maps = aggregation_maps(model, x, class_names)
        else:
            maps, _ = attention_maps(model, x)
    except (ValueError, utils.UserError) as e:
        utils.exit_with_error(e)
    image = visualize.denormalize(x[0].cpu(), *normalization(transform))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    visualize.draw_attention_grid(image, [(title, m.cpu().numpy()) for title, m in maps], args.output)
    print(f'wrote {args.output}' + (' (replaced the file that was there)' if replacing else ''))


if __name__ == '__main__':
    main()
