"""Attention maps of CabViT blocks with their digest-token columns, as in Fig. 6 of the paper.

A CabViT block's queries are its N tokens; its keys are those tokens followed by the M digest tokens of the
earlier blocks of its stage. The maps here are the block's softmax attention, (N, N + M), taken from the very
inputs its attention gets in a forward pass, so the share of attention the digests receive can be read off.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from .. import import_extra
from ..cabvit import CabViT, CabViTBlock, CabViTStage
from .hub import create_model

__all__ = ['attention_maps', 'cabvit_blocks', 'default_blocks', 'load_image', 'run_attention_command',
           'save_attention_figure']

# Fig. 6 of the paper shows blocks 2, 4, 6 of stage 3 and block 2 of stage 4 (1-based) of CabViT-H.
_HYBRID_FIG6_BLOCKS = ((1, 3, 5), (1,))


def cabvit_blocks(model: nn.Module) -> Dict[str, CabViTBlock]:
    """The model's CabViT blocks by module name, e.g. 'stages.2.blocks.1' or 'blocks.3', in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CabViTBlock)}


def default_blocks(model: nn.Module) -> List[str]:
    """The blocks of the paper's Fig. 6 where the model has them; for CabViT-P four blocks with digests.

    CabViT-H: blocks 2, 4, 6 of the first CabViT stage and block 2 of the second. CabViT-P: blocks 2, 4, 6 and
    the last, which attends to the digests of all earlier blocks.
    """
    if isinstance(model, CabViT):
        stages = [(i, s) for i, s in enumerate(model.stages) if isinstance(s, CabViTStage)]
        return [
            f'stages.{i}.blocks.{j}'
            for (i, stage), picks in zip(stages, _HYBRID_FIG6_BLOCKS) for j in picks if j < len(stage.blocks)]
    names = list(cabvit_blocks(model))
    return [names[i] for i in sorted({1, 3, 5, len(names) - 1}) if 0 < i < len(names)]


@torch.no_grad()
def attention_maps(
        model: nn.Module,
        image_tensor: torch.Tensor,
        blocks: Optional[Sequence[str]] = None,
        average_heads: bool = True,
) -> Dict[str, torch.Tensor]:
    """Softmax attention of chosen CabViT blocks for one image, in eval mode.

    A forward pre-hook on each block's attention captures the normed tokens and calibrated digests it is called
    with and recomputes the weights from them, so the maps are those of the forward pass and need no change to
    the model.

    Args:
        model: A CabViT model (CabViT-H or CabViT-P).
        image_tensor: One image, (C, H, W) or (1, C, H, W), preprocessed as the model expects (see `load_image`).
        blocks: Block names as in `cabvit_blocks`; the paper's Fig. 6 choice (`default_blocks`) if None.
        average_heads: Return (N, N + M) maps averaged over heads, else (heads, N, N + M).

    Returns:
        Block name to map on the CPU, in the order of `blocks`. Columns N.. are the M digest tokens, oldest block's
        first; N counts prefix tokens (the class token of CabViT-P) too.
    """
    available = cabvit_blocks(model)
    if not available:
        raise ValueError(f'{type(model).__name__} has no CabViT blocks, so no attention maps with digest tokens')
    blocks = list(blocks) if blocks is not None else default_blocks(model)
    unknown = [b for b in blocks if b not in available]
    if unknown:
        raise ValueError(f"unknown block(s) {', '.join(unknown)}; the model has {', '.join(available)}")
    if image_tensor.ndim == 3:
        image_tensor = image_tensor.unsqueeze(0)
    if image_tensor.ndim != 4 or image_tensor.shape[0] != 1:
        raise ValueError(f'expected one image, (C, H, W) or (1, C, H, W), got shape {list(image_tensor.shape)}')

    maps: Dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(attn: nn.Module, args: Tuple[torch.Tensor, ...], kwargs: Dict[str, torch.Tensor]) -> None:
            weights = attn.attention_weights(*args, **kwargs)[0].float()
            maps[name] = (weights.mean(0) if average_heads else weights).cpu()
        return hook

    handles = [available[name].attn.register_forward_pre_hook(capture(name), with_kwargs=True) for name in blocks]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(image_tensor.to(device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: maps[name] for name in blocks}


def save_attention_figure(
        maps: Dict[str, torch.Tensor],
        path: Union[str, Path],
        title: Optional[str] = None,
        ncols: int = 1,
        cmap: str = 'viridis',
        percentile: float = 99.5,
        dpi: int = 150,
) -> Path:
    """Write the attention maps as a PNG, one panel per block with the digest columns in a red box (Fig. 6 style).

    Each panel's colour scale spans the `100 - percentile` to `percentile` range of its values, so that a few
    sharply peaked weights do not leave the rest of the map dark; digest and token columns share it, so they
    compare directly. Panels are titled by block, digest count and the mean share of each query's attention that
    goes to the digests. Head-stacked maps (heads, N, N + M) are shown averaged over heads. Drawn on a bare
    matplotlib Figure (Agg), leaving pyplot's backend and state alone.
    """
    Figure = import_extra('matplotlib.figure', 'tools', 'Drawing attention maps').Figure
    from matplotlib.patches import Rectangle

    if not maps:
        raise ValueError('no attention maps to draw')
    path = Path(path)
    nrows = -(-len(maps) // ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (name, attn) in zip(axes.flat, maps.items()):
        attn = attn.float().mean(0) if attn.ndim == 3 else attn.float()
        num_tokens, num_keys = attn.shape
        num_digests = num_keys - num_tokens
        vmin, vmax = torch.quantile(attn.flatten(), torch.tensor([100 - percentile, percentile]) / 100).tolist()
        image = ax.imshow(attn.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation='nearest')
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        if num_digests:
            share = attn[:, num_tokens:].sum(-1).mean().item()
            ax.add_patch(Rectangle(
                (num_tokens - 0.5, -0.5), num_digests, num_tokens, fill=False, edgecolor='red', linewidth=1.5))
            ax.set_title(f'{name}: {num_digests} digests, {share:.1%} of attention', fontsize=9)
        else:
            ax.set_title(f'{name}: no digest tokens', fontsize=9)
        ax.set_xlabel(f'keys: {num_tokens} tokens + {num_digests} digests', fontsize=8)
        ax.set_ylabel('queries', fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(maps):]:
        ax.axis('off')
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def load_image(path: Union[str, Path], model: nn.Module) -> torch.Tensor:
    """A JPEG/PNG as the model's input, (1, C, H, W), with timm's eval transforms of the model's data config.

    The input size is the one the model was built for (its bias tables fix it), not the pretrained cfg's.
    """
    args = {'input_size': (model.in_chans, *model.img_size)} if hasattr(model, 'img_size') else {}
    transform = create_transform(**resolve_data_config(args, model=model))
    with Image.open(path) as img:
        img = img.convert('RGB' if model.in_chans == 3 else 'L')
    return transform(img).unsqueeze(0)


def run_attention_command(
        image: Union[str, Path],
        model_name: str,
        checkpoint: Optional[Union[str, Path]] = None,
        blocks: Optional[Sequence[str]] = None,
        out: Union[str, Path] = 'attention.png',
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
) -> Path:
    """`timm-cabvit attention`: draw the attention maps of a model for an image and return the PNG's path.

    The checkpoint is loaded by `timm_cabvit.tools.hub.create_model` through the model's checkpoint filter, so our state
    dicts, train.py checkpoints and the reference layout all work, at the input size the checkpoint records unless
    `img_size` says another. The model is built without a classifier, which the maps do not need, so checkpoints
    of any number of classes load. Without a checkpoint the weights are random, the maps near uniform, and the
    figure says so. `img_size` builds the model (and the image transform) for another input size.

    Raises ValueError for a wrong model or block, a missing checkpoint or one that does not fit the model,
    `CheckpointError` for a file that is not a readable checkpoint, OSError for an unreadable image.
    """
    if not timm.is_model(model_name):
        raise ValueError(f"unknown model '{model_name}'; CabViT models: {', '.join(timm.list_models('cabvit*'))}")
    kwargs = {'num_classes': 0}
    if img_size is not None:
        kwargs['img_size'] = img_size
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ValueError(f"checkpoint '{checkpoint}' is not a file")
    model = create_model(model_name, checkpoint=checkpoint, **kwargs).eval()
    maps = attention_maps(model, load_image(image, model), blocks)
    weights = f'weights {Path(checkpoint).name}' if checkpoint is not None else 'random weights (no checkpoint)'
    return save_attention_figure(maps, out, title=f'{model_name}, {Path(image).name}, {weights}')
