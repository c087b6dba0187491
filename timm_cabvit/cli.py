"""`timm-cabvit`: the CabViT models at a glance (parameters, FLOPs, the paper's figures, measured speed).

Subcommands: `flops` decomposes parameters and FLOPs by component, `ablation` prints the paper's Table 4
ladder for our models, `attention` draws attention maps (the paper's Fig. 6); `recipe` prints a training recipe for
timm's train.py; `export` writes a checkpoint in the Hub layout timm reads and `push` uploads it;
`export-onnx` exports to ONNX and checks the file with ONNX Runtime.
"""
import argparse
import json
import statistics
import sys
import time
from importlib.resources import files
from typing import List, Optional, Sequence

import timm
import torch
from tqdm import tqdm

from .accounting import ablation_ladder, ablation_table, flops_report, flops_table, save_flops_plot
from .flops import count_flops
from .paper import PAPER


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text}')
    return value


def _img_size(text: str) -> tuple:
    parts = text.lower().split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 256x192, got '{text}'")
    return (int(parts[0]), int(parts[-1]))


def _measure_throughput(
        model: torch.nn.Module, batch_size: int, img_size: tuple, device: torch.device,
        warmup: int, iters: int, progress: tqdm,
) -> float:
    """Median images/s of inference forward passes over `iters` timed runs."""
    x = torch.randn(batch_size, model.in_chans, *img_size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
            progress.update()
    return batch_size / statistics.median(times)


def _fmt(value: Optional[float], width: int, suffix: str = '') -> str:
    return format('-' if value is None else f'{value:.1f}{suffix}', f'>{width}')


def models_table(
        model_names: Sequence[str], batch_size: int, img_size: tuple, device: torch.device,
        warmup: int, iters: int,
) -> List[str]:
    """Rows of the overview table, measuring each model in turn."""
    header = (f"{'model':<12} {'params':>11} {'GFLOPs':>7} | {'paper params':>12} {'paper GFLOPs':>12} "
              f"{'paper top-1':>11} | {'img/s':>8}")
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'
    rows = [f'{img_size[0]}x{img_size[1]} input, batch {batch_size}, {device.type} ({where})',
            header, '-' * len(header)]
    with tqdm(total=len(model_names) * (warmup + iters), desc='measuring', unit='batch', file=sys.stderr) as progress:
        for name in model_names:
            progress.set_postfix_str(name)
            model = timm.create_model(name, img_size=img_size).eval()
            params = sum(p.numel() for p in model.parameters())
            gflops = count_flops(model, img_size) / 1e9
            model.to(device)
            throughput = _measure_throughput(model, batch_size, img_size, device, warmup, iters, progress)
            paper = PAPER.get(name) or {}
            rows.append(
                f"{name:<12} {params:>11,} {gflops:>7.3f} | {_fmt(paper.get('params_m'), 12, ' M')} "
                f"{_fmt(paper.get('gflops'), 12)} {_fmt(paper.get('top1'), 11)} | {throughput:>8.1f}")
    return rows


def recipe_path(model_name: str):
    """The packaged train.py recipe (YAML) of a model."""
    path = files('timm_cabvit') / 'recipes' / f'{model_name}.yaml'
    if not path.is_file():
        known = sorted(p.name.removesuffix('.yaml') for p in (files('timm_cabvit') / 'recipes').iterdir())
        raise ValueError(f"no training recipe for '{model_name}'; recipes exist for {', '.join(known)}")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-cabvit',
        description='CabViT models for timm. With no command: a table of the models with their parameters, '
                    'fvcore FLOPs (one multiply-add = one FLOP, as the paper counts), the paper\'s parameters, '
                    'FLOPs and ImageNet top-1 beside ours, and measured inference images/s on this machine.',
    )
    parser.add_argument('--models', nargs='+', default=sorted(PAPER), metavar='NAME',
                        help='models to show (default: all four: %(default)s)')
    parser.add_argument('--batch-size', type=_positive_int, default=8,
                        help='images per forward pass when measuring speed (default: %(default)s)')
    parser.add_argument('--img-size', type=_img_size, default=(224, 224), metavar='HxW',
                        help='input size, e.g. 224 or 256x192; models are built for it (default: 224)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device to measure on, e.g. cpu or cuda:0 (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed passes per model (default: %(default)s)')
    parser.add_argument('--iters', type=_positive_int, default=3,
                        help='timed passes per model, the median is shown (default: %(default)s)')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')
    flops = commands.add_parser(
        'flops', help='parameters and FLOPs by component, and the cost of cross-block attention',
        description='Parameters and fvcore FLOPs of each component (stem, ConvNeXt blocks, downsampling, '
                    'attention with its digest keys, TME, FFN, head) - the paper\'s Fig. 5 decomposition for '
                    'whole models - beside the same model with cross-block attention switched off.')
    flops.add_argument('models', nargs='*', default=['cabvit_h_l1', 'cabvit_h_l2'], metavar='MODEL',
                       help='models (default: cabvit_h_l1 cabvit_h_l2)')
    flops.add_argument('--img-size', type=_img_size, default=(224, 224), metavar='HxW',
                       help='input size (default: 224)')
    flops.add_argument('--json', action='store_true', help='print JSON instead of tables')
    flops.add_argument('--plot', metavar='PNG', help='also write a bar chart of the decomposition to this file')
    ablation = commands.add_parser(
        'ablation', help="the paper's ablation ladder (Table 4): parameters and FLOPs as each idea is added",
        description='Parameters and FLOPs of a model as the ideas of the paper are switched on one at a time '
                    '(model arguments cross_block and digest_scale), beside the increments of the paper\'s '
                    'Table 4 and its "about 13 %% extra compute".')
    ablation.add_argument('model', nargs='?', default='cabvit_h_l1', help='model (default: %(default)s)')
    ablation.add_argument('--img-size', type=_img_size, default=(224, 224), metavar='HxW',
                          help='input size (default: 224)')
    ablation.add_argument('--json', action='store_true', help='print JSON instead of a table')
    attention = commands.add_parser(
        'attention', help='draw the attention maps of chosen blocks, digest-token columns marked, as a PNG',
        description="The softmax attention of chosen CabViT blocks for one image (queries x [tokens; digests]), "
                    "the digest-token columns in a red box, as in the paper's Fig. 6.")
    attention.add_argument('image', help='image file (JPEG, PNG, ...)')
    attention.add_argument('--model', required=True, metavar='NAME', help='CabViT model, e.g. cabvit_h_l1')
    attention.add_argument('--checkpoint', metavar='FILE',
                           help='weights (ours, a train.py checkpoint or the reference layout); default: random')
    attention.add_argument('--blocks', nargs='+', metavar='NAME',
                           help='blocks, e.g. stages.2.blocks.1 (default: blocks 2, 4, 6 of stage 3 and 2 of '
                                'stage 4; CabViT-P: blocks.1 blocks.3 blocks.5 blocks.11)')
    attention.add_argument('--img-size', type=_img_size, metavar='HxW',
                           help='input size the model is built for (default: 224)')
    attention.add_argument('--out', default='attention.png', metavar='PNG', help='file to write (default: %(default)s)')
    recipe = commands.add_parser(
        'recipe', help="print a model's ImageNet training recipe for timm's train.py",
        description="Print the paper's ImageNet training recipe of a model as a YAML config for timm's train.py "
                    '(train.py -c FILE), or with --path where the file is.')
    recipe.add_argument('model', help='model name, e.g. cabvit_h_l2')
    recipe.add_argument('--path', action='store_true', help='print the path of the YAML file instead of its text')

    export = commands.add_parser(
        'export', help='write a checkpoint as config.json, model.safetensors and README.md for the Hub',
        description='Write the Hub layout timm reads (config.json, model.safetensors, a README.md model card) '
                    'from a checkpoint: our own state dict, a timm train.py checkpoint or the authors\' '
                    'reference layout. The weights are loaded strictly; nothing is exported partially.')
    export.add_argument('checkpoint', help='checkpoint file (.pth, .pth.tar, .bin or .safetensors)')
    export.add_argument('--model', required=True, metavar='NAME',
                        help='CabViT model, optionally with its tag, e.g. cabvit_h_l2.in1k')
    export.add_argument('--out', required=True, metavar='DIR', help='folder to write')
    export.add_argument('--metric', action='append', default=[], metavar='NAME=VALUE',
                        help='evaluation result for the model card, e.g. top1=83.0 (repeatable)')
    export.add_argument('--img-size', type=_img_size, metavar='HxW',
                        help='training input size, when not a square one readable from the checkpoint')
    export.add_argument('--repo-id', metavar='ORG/NAME', help="the Hub repo it is for (default: the tag's)")

    onnx = commands.add_parser(
        'export-onnx', help='export a model to ONNX and check it against PyTorch with ONNX Runtime',
        description='Export a model to ONNX (BatchNorm folded, dynamic batch) and check it: ONNX Runtime against '
                    'PyTorch on random images of batch 1 and 3 (max abs difference < 1e-4). The image size is '
                    'fixed: the attention bias tables are sized for it.')
    onnx.add_argument('model', metavar='NAME', help='model name, e.g. cabvit_h_l2')
    onnx.add_argument('out', metavar='OUT.onnx', help='ONNX file to write')
    onnx.add_argument('--img-size', type=_img_size, metavar='HxW',
                      help='input size the model is built for and the graph takes (default: 224)')
    onnx.add_argument('--opset', type=int, default=18, help='ONNX opset, 17 or newer (default: %(default)s)')
    onnx.add_argument('--no-reparam', action='store_true',
                      help='export without folding the BatchNorms into the convolutions')
    onnx.add_argument('--checkpoint', metavar='FILE',
                      help='weights to load: our state dict, a timm train.py checkpoint or the reference layout')

    push = commands.add_parser(
        'push', help='upload an exported folder to a Hugging Face Hub model repo',
        description='Upload a folder written by `timm-cabvit export` to a Hub model repo, creating the repo if '
                    'needed. Log in first with `hf auth login` or set HF_TOKEN.')
    push.add_argument('dir', help='folder written by timm-cabvit export')
    push.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='model repo to upload to')
    push.add_argument('--token', help='Hub token with write access (default: the logged-in one)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', help='branch to commit to')
    push.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    push.add_argument('--commit-message', default='Add CabViT weights', help='commit message')
    return parser


def _run_hub_command(args: argparse.Namespace) -> int:
    from . import hub
    try:
        if args.command == 'export':
            folder = hub.export_checkpoint(
                args.checkpoint, args.model, args.out, metrics=hub.parse_metrics(args.metric),
                img_size=args.img_size, repo_id=args.repo_id)
            print(folder)
        else:
            print(hub.push(
                args.dir, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                create_pr=args.create_pr, commit_message=args.commit_message))
    except (hub.CheckpointError, ValueError) as e:
        print(f'timm-cabvit {args.command}: {e}', file=sys.stderr)
        return 1
    return 0


def _run_export_onnx(args: argparse.Namespace) -> int:
    try:
        from .deploy import export_onnx

        report = export_onnx(
            args.model, args.out, img_size=args.img_size, opset=args.opset,
            reparameterize=not args.no_reparam, checkpoint=args.checkpoint)
    except ImportError as e:
        print(f'timm-cabvit export-onnx: {e}; pip install onnx onnxruntime', file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as e:
        print(f'timm-cabvit export-onnx: {e}', file=sys.stderr)
        return 1
    h, w = report['img_size']
    print(f"{report['path']}: opset {report['opset']}, input (batch, 3, {h}, {w}), {report['params']:,} parameters "
          f"({report['params_before']:,} before folding BatchNorm); ONNX Runtime against PyTorch at batch "
          f"{' and '.join(map(str, report['batch_sizes']))}: max abs difference {report['max_abs_diff']:.1e}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == 'recipe':
        try:
            path = recipe_path(args.model)
        except ValueError as e:
            print(f'timm-cabvit: {e}', file=sys.stderr)
            return 2
        print(path if args.path else path.read_text(), end='\n' if args.path else '')
        return 0
    import timm_cabvit  # noqa: F401  (registers the models)
    if args.command in ('export', 'push'):
        return _run_hub_command(args)
    models = [args.model] if hasattr(args, 'model') else args.models
    unknown = [m for m in models if m not in timm.list_models('cabvit*')]
    if unknown:
        print(f"timm-cabvit: unknown model(s) {', '.join(unknown)}; "
              f"choose from {', '.join(timm.list_models('cabvit*'))}", file=sys.stderr)
        return 2
    if args.command == 'flops':
        reports = [flops_report(name, args.img_size) for name in args.models]
        if args.json:
            print(json.dumps(reports, indent=2))
        else:
            print('\n\n'.join('\n'.join(flops_table(report)) for report in reports))
        if args.plot:
            save_flops_plot(reports, args.plot)
        return 0
    if args.command == 'export-onnx':
        return _run_export_onnx(args)
    if args.command == 'attention':
        from .attention_maps import run_attention_command
        try:
            print(run_attention_command(args.image, args.model, checkpoint=args.checkpoint, blocks=args.blocks,
                                        out=args.out, img_size=args.img_size))
        except (ValueError, OSError) as e:
            print(f'timm-cabvit attention: {e}', file=sys.stderr)
            return 1
        return 0
    if args.command == 'ablation':
        ladder = ablation_ladder(args.model, args.img_size)
        print(json.dumps(ladder, indent=2) if args.json else '\n'.join(ablation_table(args.model, ladder)))
        return 0
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        print(f"timm-cabvit: --device {args.device} asked for, but no CUDA device is available", file=sys.stderr)
        return 2
    print('\n'.join(models_table(args.models, args.batch_size, args.img_size, device, args.warmup, args.iters)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
