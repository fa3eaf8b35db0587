"""Write a checkpoint's model (or EMA) weights as a .safetensors file that --finetune and hubs read.

    python scripts/export.py runs/deit_s/best_checkpoint.pth deit_s.safetensors [--ema]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safetensors.torch import save_file  # noqa: E402

import utils  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='a checkpoint written by main.py (or any dict with a "model" entry)')
    p.add_argument('output', help='the .safetensors file to write (must not exist yet; missing folders are made)')
    p.add_argument('--ema', action='store_true', help='export the EMA weights instead of the model')
    args = p.parse_args(argv)
    try:
        if utils.check_output_file(args.output, 'output file'):
            raise utils.UserError(f'{args.output} exists; choose another name or delete it first')
        ckpt = utils.load_checkpoint(args.checkpoint)
        key = 'model_ema' if args.ema else 'model'
        if key not in ckpt:
            raise utils.UserError(f'{args.checkpoint} has no {key} entry' + ('; drop --ema' if args.ema else ''))
        state = {k: v.contiguous() for k, v in ckpt[key].items()}
        metadata = {'source': os.path.basename(args.checkpoint), 'model': str(ckpt.get('args', {}).get('model', ''))}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        save_file(state, args.output, metadata=metadata)
    except utils.UserError as e:
        utils.exit_with_error(e)
    print(f'wrote {len(state)} tensors to {args.output}')


if __name__ == '__main__':
    main()
