"""Parameters and GMACs of every model with published figures, next to those figures, as a markdown table.

    python scripts/model_table.py                     # every model in the families' PAPER_FIGURES, and --localvit
    python scripts/model_table.py --model dhvt_tiny_patch4_32 --check
    python scripts/model_table.py --model L60         # any timm model; '-' where no paper prints figures

Models are built on the meta device (no memory; the CPU only for ops without a meta kernel) and run once at
their pretrained_cfg input size, batch 1, under torch.utils.flop_counter.FlopCounterMode. It counts 2 FLOPs
per multiply-accumulate, while the papers' "GFLOPs" are multiply-accumulates: GMACs = FLOPs / 2 / 1e9.
--check exits with 1 when a model is more than 3% off a published figure (and does not round to it either).
"""
import argparse
import os
import sys
from typing import NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

import dhvt_models  # noqa: E402
import evit_models  # noqa: E402
import localvit_models  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
import patchconvnet_models  # noqa: E402

FAMILIES = (models, localvit_models, dhvt_models, evit_models, patchconvnet_models)
TOLERANCE = 0.03


class Row(NamedTuple):
    model: str
    params: float  # millions
    paper_params: Optional[float]  # None for a model whose paper prints no figures
    gmacs: float
    paper_gmacs: Optional[float]
    code_gmacs: Optional[float] = None  # the original code's count, where the paper's table disagrees with it
    code_params: Optional[float] = None  # what the original code trains, where the paper also counts unused layers

    @property
    def params_diff(self):
        return None if self.paper_params is None else self.params / self.paper_params - 1

    @property
    def gmacs_diff(self):
        return None if self.paper_gmacs is None else self.gmacs / self.paper_gmacs - 1

    @property
    def matches(self):
        gmacs_match = self.paper_gmacs is None or _close(self.gmacs, self.paper_gmacs) or \
            (self.code_gmacs is not None and _close(self.gmacs, self.code_gmacs))
        params_match = self.paper_params is None or _close(self.params, self.paper_params) or \
            (self.code_params is not None and _close(self.params, self.code_params))
        return params_match and gmacs_match


def _close(ours, paper):
    """Within TOLERANCE, or equal at the paper's printed precision (0.39 GMACs is a match for a printed 0.4)."""
    decimals = len(repr(float(paper)).partition('.')[2])
    return abs(ours / paper - 1) <= TOLERANCE or round(ours, decimals) == paper


def paper_figures():
    """{model name: (params in millions, GMACs or None)} merged from every family module, in family order."""
    merged = {}
    for module in FAMILIES:
        merged.update(getattr(module, 'PAPER_FIGURES', {}))
    return merged


def code_gmacs():
    """{model name: GMACs the original code computes} where a paper's table disagrees with its own code."""
    merged = {}
    for module in FAMILIES:
        merged.update(getattr(module, 'ORIGINAL_CODE_GMACS', {}))
    return merged


def measure(name, **options):
    """(params in millions, GMACs) of timm model `name` (built with `options`) at its pretrained_cfg input size,
    batch 1."""
    input_size = _input_size(name)
    try:
        return _count(name, input_size, torch.device('meta'), options)
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel, or data-dependent shapes
        return _count(name, input_size, torch.device('cpu'), options)


def _input_size(name):
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f'{name} is not a timm model with a pretrained_cfg; check the name in PAPER_FIGURES')
    return cfg.input_size


def _count(name, input_size, device, options):
    with device:
        model = timm.create_model(name, **options).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        flops = utils.count_flops(lambda: model(torch.zeros(1, *input_size, device=device)))
    return params / 1e6, flops / 2 / 1e9


def table_rows(names=None):
    """One Row per model: all with published figures, or the given names (any timm model; '-' without figures)."""
    figures, from_code = paper_figures(), code_gmacs()
    unknown = sorted(n for n in names or () if n not in figures and not timm.is_model(n))
    if unknown:
        raise ValueError(f'unknown model {", ".join(unknown)}; pass a timm model name (timm.list_models() has them)')
    rows = []
    for name in names or figures:
        params, gmacs = measure(name)
        paper_params, paper_gmacs = figures.get(name, (None, None))
        rows.append(Row(name, params, paper_params, gmacs, paper_gmacs, from_code.get(name)))
    return rows if names else rows + improved_localvit_rows()


def improved_localvit_rows():
    """The 24-hour paper's improved LocalViT (`--localvit --localvit-act hs`) on the models it reports."""
    rows = []
    for name, (paper_params, paper_gmacs) in localvit_models.IMPROVED_PAPER_FIGURES.items():
        params, gmacs = measure(name, **localvit_models.improved_localvit_options('hs'))
        trained, _ = localvit_models.IMPROVED_CODE_PARAMS[name]
        rows.append(Row(f'{name} --localvit', params, paper_params, gmacs, paper_gmacs, code_params=trained / 1e6))
    return rows


def markdown(rows):
    lines = ['| model | params (M) ours | paper | GMACs ours | paper | diff % (params / GMACs) |',
             '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        paper_gmacs = '-' if r.paper_gmacs is None else f'{r.paper_gmacs:g}'
        if r.code_gmacs is not None:
            paper_gmacs += f' (its code: {r.code_gmacs:g})'
        paper_params = '-' if r.paper_params is None else f'{r.paper_params:g}'
        if r.code_params is not None:
            paper_params += f' (its code trains: {r.code_params:.2f})'
        params_diff = '-' if r.params_diff is None else f'{100 * r.params_diff:+.1f}'
        gmacs_diff = '-' if r.gmacs_diff is None else f'{100 * r.gmacs_diff:+.1f}'
        lines.append(f'| {r.model} | {r.params:.2f} | {paper_params} | {r.gmacs:.2f} | {paper_gmacs} | '
                     f'{params_diff} / {gmacs_diff} |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', action='append',
                   help='only this model (repeatable; any timm model); default: all with published figures')
    p.add_argument('--check', action='store_true', help=f'exit 1 when any model is more than '
                                                        f'{TOLERANCE * 100:.0f}%% off its paper')
    args = p.parse_args(argv)
    try:
        rows = table_rows(args.model)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(markdown(rows))
    off = [r.model for r in rows if not r.matches]
    if args.check and off:
        print(f'more than {TOLERANCE:.0%} off the paper: {", ".join(off)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
