"""Convergence of a CabViT model beside its ablations and timm peers: the paper's Fig. 7 claim, at any scale.

Trains each configuration (by default the CabViT model, the same model with `cross_block=False`, and a ConvNeXt or
DeiT peer) on an ImageFolder dataset (`train/` and `val/` of class folders) with timm's dataset, loader,
optimizer and scheduler factories, for the same budget, seed and data. Writes the training loss of every step
(`steps.csv`), the validation loss and top-1 of every epoch (`epochs.csv`), both as curves (`curves.png`), and
prints a summary table. The GPU is used when there is one.

Every configuration sees the same batches: the sampler and the augmentation are reseeded at each epoch. With
`--workers 0` the augmentation shares the random stream with the model, so models that draw random numbers in
training (`--drop-path` > 0) then get differently augmented batches (in the same order).

    python benchmarks/convergence.py /data/imagenette2-160 --model cabvit_h_l1 --img-size 160 --epochs 30
    # a tiny learnable dataset at 64 px: under a minute on two busy CPU cores
    python benchmarks/convergence.py --make-dataset /tmp/synthetic --epochs 2 --batch-size 16 --threads 1
"""
import argparse
import colorsys
import csv
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset, create_loader
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed

import timm_cabvit  # noqa: F401  (registers the CabViT models with timm)
from timm_cabvit.tools.deploy import calibrate_batchnorm
from timm_cabvit.tools.flops import num_params

# Each variant removes one idea of the paper from the CabViT model (model arguments of the registered models).
VARIANTS = {
    'cabvit': {},
    'no_cross_block': {'cross_block': False},
    'no_digest_scale': {'digest_scale': False},
}
# Peers: ConvNeXt for the hybrid models (the paper's Fig. 7 baseline), DeiT-Tiny, its starting point, for the plain one.
DEFAULT_PEERS = {'cabvit_h': 'convnext_pico', 'cabvit_p': 'deit_tiny_patch16_224'}


@dataclass
class Config:
    """One training run: a label for the curves and table, a timm model name and its model arguments."""
    label: str
    model: str
    kwargs: Dict[str, Any] = field(default_factory=dict)


def _stripes(rng: np.random.Generator, hue: float, vertical: bool, size: int) -> np.ndarray:
    """An image of sinusoidal stripes in one hue, with random period, phase, shades and pixel noise."""
    hue = (hue + rng.uniform(-0.04, 0.04)) % 1.
    saturation = rng.uniform(0.55, 1.)
    dark = np.array(colorsys.hsv_to_rgb(hue, saturation, rng.uniform(0.15, 0.35)))
    bright = np.array(colorsys.hsv_to_rgb(hue, saturation, rng.uniform(0.75, 1.)))
    coord = np.arange(size)[None, :] if vertical else np.arange(size)[:, None]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * coord / rng.uniform(6, 14) + rng.uniform(0, 2 * np.pi))
    wave = np.broadcast_to(wave, (size, size))[..., None]
    img = dark + (bright - dark) * wave + rng.normal(0, 0.05, (size, size, 3))
    return (img.clip(0, 1) * 255).astype(np.uint8)


def make_dataset(
        root: Path,
        num_classes: int = 4,
        train_per_class: int = 32,
        val_per_class: int = 8,
        size: int = 64,
        seed: int = 0,
) -> Path:
    """Write a small ImageFolder dataset that a model can learn in a few hundred steps, so the script runs anywhere.

    A class is a hue and a stripe orientation (classes 2k and 2k + 1 share a hue), so a model needs both colour
    and spatial structure. Both survive timm's training augmentation (random resized crops, horizontal flips and
    colour jitter keep hue and orientation).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    num_hues = math.ceil(num_classes / 2)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(num_classes):
            hue_idx, vertical = c // 2, bool(c % 2)
            folder = root / split / f'{c:02d}_hue{hue_idx}_{"vertical" if vertical else "horizontal"}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_stripes(rng, hue_idx / num_hues, vertical, size)).save(folder / f'{i:04d}.png')
    return root


def default_configs(model: str, variants: Sequence[str], peers: Optional[Sequence[str]]) -> List[Config]:
    """The CabViT model in each variant, then the peers (the family's default peer if `peers` is None)."""
    configs = [Config(model if v == 'cabvit' else f'{model} {v}', model, dict(VARIANTS[v])) for v in variants]
    if peers is None:
        peers = [peer for prefix, peer in DEFAULT_PEERS.items() if model.startswith(prefix)]
    return configs + [Config(peer, peer) for peer in peers]


def create_model(config: Config, num_classes: int, img_size: int, drop_path_rate: float) -> nn.Module:
    """The config's model; those with a fixed input size (ViTs, CabViT) are built for `img_size`."""
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate, **config.kwargs)
    cfg = get_pretrained_cfg(config.model)
    if cfg is not None and cfg.fixed_input_size:
        kwargs['img_size'] = img_size
    return timm.create_model(config.model, **kwargs)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool) -> Tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over the loader."""
    model.eval()
    loss_sum, correct, count = 0., 0, 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction='sum').item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    return loss_sum / count, 100. * correct / count


def train(
        config: Config,
        train_loader,
        val_loader,
        num_classes: int,
        args: argparse.Namespace,
        device: torch.device,
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], Dict[str, Any]]:
    """Train one configuration for the budget; returns its step rows, epoch rows and summary row."""
    random_seed(args.seed)
    model = create_model(config, num_classes, args.img_size, args.drop_path).to(device)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    updates_per_epoch = len(train_loader)
    total_steps = args.steps or args.epochs * updates_per_epoch
    # scheduled in steps, so that a step budget ends its schedule exactly
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=total_steps, warmup_epochs=args.warmup_steps, warmup_lr=args.lr / 100,
        step_on_epochs=False, updates_per_epoch=1)
    params = num_params(model)
    step_rows, epoch_rows = [], []
    step, train_time = 0, 0.
    for epoch in range(math.ceil(total_steps / updates_per_epoch)):
        random_seed(args.seed + epoch)  # the same batch order and augmentation for every configuration
        model.train()
        start = time.perf_counter()
        epoch_losses = []
        for images, targets in train_loader:
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = F.cross_entropy(model(images).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            epoch_losses.append(loss.item())
            step_rows.append(dict(config=config.label, step=step, epoch=epoch, lr=optimizer.param_groups[0]['lr'],
                                  loss=epoch_losses[-1]))
            if step == total_steps:
                break
        train_time += time.perf_counter() - start
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            calibrate_batchnorm(model, (images for images, _ in itertools.islice(train_loader, args.precise_bn)))
        val_loss, val_top1 = evaluate(model, val_loader, device, args.amp)
        epoch_rows.append(dict(config=config.label, epoch=epoch, step=step, train_loss=float(np.mean(epoch_losses)),
                               val_loss=val_loss, val_top1=val_top1))
        print(f'{config.label:<28} epoch {epoch:>3}  step {step:>6}  train loss {epoch_rows[-1]["train_loss"]:.4f}  '
              f'val loss {val_loss:.4f}  val top-1 {val_top1:6.2f}', flush=True)
    summary = dict(
        config=config.label, params=params, steps=step,
        mean_loss=float(np.mean([r['loss'] for r in step_rows])),
        final_loss=epoch_rows[-1]['train_loss'],
        val_loss=epoch_rows[-1]['val_loss'], val_top1=epoch_rows[-1]['val_top1'],
        best_top1=max(r['val_top1'] for r in epoch_rows),
        ms_per_step=1e3 * train_time / step,
    )
    return step_rows, epoch_rows, summary


def write_csv(rows: List[Dict[str, Any]], path: Path) -> Path:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start), the same length as `values`."""
    cumsum = np.cumsum(np.insert(values, 0, 0.))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_curves(step_rows: List[Dict[str, Any]], epoch_rows: List[Dict[str, Any]], path: Path):
    """Training loss per step (moving average) and validation top-1 per epoch, one curve per configuration.

    Takes the rows as `train` returns them or as read back from the CSV files (strings). Returns the matplotlib
    figure (a bare Figure, drawn by Agg), whose axes hold one line per configuration.
    """
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(r['config'] for r in step_rows))
    window = max(1, max(int(r['step']) for r in step_rows) // 25)
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label in labels:
        steps = np.array([int(r['step']) for r in step_rows if r['config'] == label])
        losses = np.array([float(r['loss']) for r in step_rows if r['config'] == label])
        ax_loss.plot(steps, _moving_average(losses, window), label=label)
        epochs = [r for r in epoch_rows if r['config'] == label]
        ax_acc.plot([int(r['step']) for r in epochs], [float(r['val_top1']) for r in epochs], marker='o', label=label)
    ax_loss.set(xlabel='step', ylabel=f'training loss (mean of {window} steps)' if window > 1 else 'training loss',
                title='Training loss')
    ax_acc.set(xlabel='step', ylabel='top-1 (%)', title='Validation accuracy (end of each epoch)')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def format_table(summaries: List[Dict[str, Any]]) -> str:
    header = (f"{'config':<28} {'params':>10} {'steps':>6} {'mean loss':>9} {'final loss':>10} {'val loss':>8} "
              f"{'val top-1':>9} {'best top-1':>10} {'ms/step':>8}")
    rows = [header, '-' * len(header)]
    for s in summaries:
        rows.append(
            f"{s['config']:<28} {s['params']:>10,} {s['steps']:>6} {s['mean_loss']:>9.4f} {s['final_loss']:>10.4f} "
            f"{s['val_loss']:>8.4f} {s['val_top1']:>9.2f} {s['best_top1']:>10.2f} {s['ms_per_step']:>8.1f}")
    return '\n'.join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        epilog='mean loss: the training loss averaged over all steps, lower for a model that converges faster; '
               'final loss: averaged over the last epoch.')
    parser.add_argument('data', nargs='?', help='ImageFolder root with train/ and val/ (default: --make-dataset DIR)')
    parser.add_argument('--make-dataset', metavar='DIR',
                        help='write a small synthetic dataset (hue x stripe orientation classes) to DIR and train on '
                             'it when no data is given')
    parser.add_argument('--model', default='cabvit_h_l1', metavar='NAME', help='CabViT model (default: %(default)s)')
    parser.add_argument('--variants', nargs='+', default=['cabvit', 'no_cross_block'], choices=list(VARIANTS),
                        metavar='VARIANT',
                        help=f"variants of the CabViT model to train, of {', '.join(VARIANTS)} "
                             '(default: cabvit no_cross_block)')
    parser.add_argument('--peers', nargs='*', metavar='NAME',
                        help='timm models to train beside it (default: convnext_pico for CabViT-H, '
                             'deit_tiny_patch16_224 for CabViT-P; none if given empty)')
    parser.add_argument('--img-size', type=int, metavar='PX',
                        help='input size (default: 64 with --make-dataset, else 224)')
    parser.add_argument('--epochs', type=int, default=10, help='epochs per configuration (default: %(default)s)')
    parser.add_argument('--steps', type=int, help='optimizer steps per configuration, instead of --epochs')
    parser.add_argument('--batch-size', type=int, default=32, help='(default: %(default)s)')
    parser.add_argument('--opt', default='adamw', help="timm optimizer name (default: %(default)s)")
    parser.add_argument('--lr', type=float, default=1e-3, help='peak learning rate (default: %(default)s)')
    parser.add_argument('--weight-decay', type=float, default=0.05, help='(default: %(default)s)')
    parser.add_argument('--sched', default='cosine',
                        help='timm scheduler name, stepped every step (default: %(default)s)')
    parser.add_argument('--warmup-steps', type=int, default=0, help='linear warm-up steps (default: %(default)s)')
    parser.add_argument('--drop-path', type=float, default=0., help='stochastic depth rate (default: %(default)s)')
    parser.add_argument('--precise-bn', type=int, default=10, metavar='BATCHES',
                        help='before each evaluation, recompute BatchNorm statistics over this many training batches; '
                             '0 keeps the running averages, which lag far behind the weights in short runs '
                             '(default: %(default)s)')
    parser.add_argument('--workers', type=int, default=4 if torch.cuda.is_available() else 0,
                        help='data loader processes (default: %(default)s)')
    parser.add_argument('--threads', type=int, help="CPU threads of torch (default: torch's)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='(default: %(default)s)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    parser.add_argument('--out', default='convergence', help='output folder (default: %(default)s)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None and args.make_dataset is None:
        parser.error('give an ImageFolder root or --make-dataset DIR')
    if args.make_dataset is not None:
        make_dataset(Path(args.make_dataset), size=args.img_size or 64, seed=args.seed)
    data = Path(args.data or args.make_dataset)
    args.img_size = args.img_size or (64 if args.data is None else 224)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loaders = []
    for split, is_training in (('train', True), ('val', False)):
        dataset = create_dataset('', root=str(data), split=split, is_training=is_training)
        loaders.append(create_loader(
            dataset, input_size=(3, args.img_size, args.img_size), batch_size=args.batch_size,
            is_training=is_training, num_workers=args.workers, device=device, use_prefetcher=device.type == 'cuda',
            pin_memory=device.type == 'cuda', persistent_workers=False))
    num_classes = len(loaders[0].dataset.reader.class_to_idx)
    if not len(loaders[0]):
        parser.error(f'{len(loaders[0].dataset)} training images make no full batch of --batch-size {args.batch_size}')

    step_rows, epoch_rows, summaries = [], [], []
    for config in default_configs(args.model, args.variants, args.peers):
        steps, epochs, summary = train(config, *loaders, num_classes, args, device)
        step_rows += steps
        epoch_rows += epochs
        summaries.append(summary)
    write_csv(step_rows, out / 'steps.csv')
    write_csv(epoch_rows, out / 'epochs.csv')
    plot_curves(step_rows, epoch_rows, out / 'curves.png')
    print(f'\n{data}: {num_classes} classes, {len(loaders[0].dataset)} training images at {args.img_size}px, '
          f'batch {args.batch_size}, {args.opt} lr {args.lr}, {device}')
    print(format_table(summaries))
    print(f'\nwrote {out / "steps.csv"}, {out / "epochs.csv"}, {out / "curves.png"}')
    return summaries


if __name__ == '__main__':
    main()
