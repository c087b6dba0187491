""" Checkpoints of CabViT models: reading files, tables saved for other input sizes, and the fit check

What `checkpoint_filter_fn` and the models' `load_state_dict` pre-hook (in `cabvit.py`, with the reference layout)
and the Hub code need to turn a checkpoint into the state dict of a given model, or to say precisely why it cannot
be one:

- reading a file once (`read_checkpoint`), with errors that name it when it is missing, truncated or not a
  checkpoint at all, and the input size it was trained at where the file records it (`checkpoint_metadata`);
- unwrapping timm train.py checkpoints (EMA weights first, DDP / torch.compile prefixes: `unwrap_checkpoint`);
- resampling the position biases, depth biases and digest scales saved for another token grid (`resample_tables`),
  by grid shape: the grids come from the input size the checkpoint was trained at (`saved_img_size`);
- the fit check (`check_fits`): all keys and shapes, finite floating point values, never a partial load.

A model takes part through two attributes: `pretrained_cfg` (timm's) and `table_grids(img_size)`, the grid each
of its tables is laid out on, keyed by state-dict name. This module imports no model code and names none of its
tables (but timm's `relative_position_bias_table`, whose layout is timm's); the geometry of resampling is in
`layers.py`.
"""
import argparse
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .layers import resize_rel_pos_table, resize_token_grid

__all__ = [
    'CheckpointError', 'CheckpointMismatchError', 'check_checkpoint_file', 'check_fits', 'checkpoint_metadata',
    'fits_grids', 'parse_img_size', 'read_checkpoint', 'resample_tables', 'saved_img_size', 'unwrap_checkpoint',
]

PathLike = Union[str, os.PathLike]
Grid = Tuple[int, int]

# the weights files timm's save_for_hf writes beside its config.json
EXPORT_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')


class CheckpointError(RuntimeError):
    """A checkpoint or Hub repo that cannot be used; the message names it and says what to do."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A state dict that does not fit the model: a RuntimeError as `load_state_dict`'s own, a ValueError as a wrong
    argument."""


# Files

def _safetensors_header(data: bytes) -> Dict[str, Any]:
    """The JSON header of a safetensors file's bytes (KeyError, ValueError or TypeError where there is none)."""
    return json.loads(data[8:8 + int.from_bytes(data[:8], 'little')])


def _check_safetensors(data: bytes) -> Optional[str]:
    """What is wrong with a safetensors file, from its header and length, or None."""
    size = len(data)
    if size < 8:
        return f'{size} bytes, shorter than a safetensors header'
    header_len = int.from_bytes(data[:8], 'little')
    if header_len > size - 8:
        return f'its header claims {header_len} bytes but the file has {size}'
    try:
        header = _safetensors_header(data)
        end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return 'its header is not valid safetensors metadata'
    if 8 + header_len + end != size:
        return f'{size} bytes where its header promises {8 + header_len + end}'
    return None


def _check_torch_file(data: bytes) -> Optional[str]:
    """What is wrong with a torch.save file: a zip archive (torch >= 1.6) or a legacy pickle, or None."""
    if data[:2] == b'\x80\x02':  # legacy torch.save: pickle protocol 2, checked by torch.load
        return None
    if data[:4] != b'PK\x03\x04':
        return 'not a PyTorch or safetensors checkpoint'
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f'its zip archive is incomplete ({e})'
    return f'its member {bad} fails the CRC check' if bad else None


def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    """By name or by content (`head`, the file's first bytes): an 8-byte header length followed by a JSON object."""
    if path.suffix == '.safetensors':
        return True
    return len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < size


def _read_checked(path: PathLike, what: str = '', remedy: str = '') -> Tuple[Path, bytes]:
    """The file's bytes, read once, after checking it is a whole checkpoint; else a CheckpointError naming it."""
    path = Path(path)
    what = f"Checkpoint file '{path}'" + (f' ({what})' if what else '')
    if path.is_dir():
        raise CheckpointError(f'{what} is a directory; give the weights file in it (e.g. model.safetensors).')
    if not path.is_file():
        raise CheckpointError(f'{what} does not exist.')
    data = path.read_bytes()
    if not data:
        problem = 'it is empty'
    elif _is_safetensors(path, data, len(data)):
        problem = _check_safetensors(data)
    else:
        problem = _check_torch_file(data)
    if problem == 'not a PyTorch or safetensors checkpoint':
        raise CheckpointError(f'{what} is {problem}: give a .safetensors file or one written by torch.save.')
    if problem:
        remedy = remedy or 'Copy or download it again, or export it again from the training checkpoint.'
        raise CheckpointError(f'{what} is truncated or corrupt: {problem}. {remedy}')
    return path, data


def check_checkpoint_file(path: PathLike, what: str = '', remedy: str = '') -> Path:
    """Fail with the file's name if it is missing, empty, truncated, corrupt or not a checkpoint at all.

    So that a bad download or copy is reported as such instead of as an obscure deserialization error deep inside
    timm, torch or safetensors. `read_checkpoint` checks the same from the bytes it loads.

    Args:
        path: Checkpoint file, .safetensors or a torch.save file (.pth, .pth.tar, .bin).
        what: What the file is, for the message, e.g. "the cached download of Hub repo 'org/name'".
        remedy: What to do about a corrupt file, instead of copying or exporting it again.
    """
    return _read_checked(path, what, remedy)[0]


def _torch_load(file: Union[Path, io.BytesIO], mmap: bool = False) -> Any:
    """torch.load without executing code; timm train.py checkpoints keep their argparse args."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(file, map_location='cpu', weights_only=True, mmap=mmap)


def read_checkpoint(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The whole checkpoint in a file (a state dict, or a train.py checkpoint with its args) and what it records
    of its model (`checkpoint_metadata`), from one read of the file: checked, loaded and its metadata taken from
    the same bytes. Errors name the file."""
    path, data = _read_checked(path)
    is_safetensors = _is_safetensors(path, data, len(data))
    try:
        contents = safetensors.torch.load(data) if is_safetensors else _torch_load(io.BytesIO(data))
    except pickle.UnpicklingError as e:
        found = re.findall(r'GLOBAL (\S+)', str(e)) or re.findall(r'Unsupported global: (\S+)', str(e))
        objects = f' ({", ".join(dict.fromkeys(found))})' if found else ''
        raise CheckpointError(
            f"Checkpoint file '{path}' was refused as unsafe: besides tensors it pickles Python objects{objects}, "
            f"and loading them would run code from the file. If you trust it, save its weights alone: "
            f"torch.save(torch.load(FILE, weights_only=False)['state_dict'], 'weights.pth') (or the state dict it "
            f"holds under another key).") from None
    except (RuntimeError, EOFError, ValueError, OSError, safetensors.SafetensorError) as e:
        reason = str(e).split('\n', 1)[0]
        raise CheckpointError(
            f"Checkpoint file '{path}' could not be read: it is truncated, corrupt or holds objects other than "
            f"tensors ({reason}).") from e
    header = _safetensors_header(data).get('__metadata__') if is_safetensors else None
    return contents, _file_metadata(path, contents, header or {})


def parse_img_size(value: Any, where: str) -> Grid:
    """(H, W) from an int, a pair, or text as people write it ('96', '96x64', '96X64', '96,64', '(96, 64)').

    Raises a CheckpointError naming `where` for anything else: a size recorded wrongly must not be skipped, or the
    tables would be read for a size they were not trained at.
    """
    if isinstance(value, str):
        parts = re.fullmatch(r'\s*[(\[]?\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?[)\]]?\s*', value)
        value = (int(parts[1]), int(parts[2] or parts[1])) if parts else None
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) in (1, 2) and all(isinstance(v, int) for v in value):
        value = (value[0], value[-1])
    if not value or min(value) < 1:
        raise CheckpointError(f"{where} is not an input size: give it as H x W, e.g. '224x224' or '96x64'.")
    return tuple(value)


def _config_metadata(config: Path) -> Dict[str, Any]:
    """What the config.json of a Hub export records: architecture, input size and channels, classes, pooling."""
    try:
        cfg = json.loads(config.read_text(encoding='utf-8'))
        input_size = cfg['pretrained_cfg']['input_size']
        meta = {'architecture': cfg['architecture'], 'in_chans': int(input_size[0]),
                'img_size': parse_img_size(list(input_size[-2:]), f"input_size of '{config}'")}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"'{config}' is not the config.json of a timm export ({e}); export the folder again.") from e
    if isinstance(cfg.get('num_classes'), int):
        meta['num_classes'] = cfg['num_classes']
    if isinstance((cfg.get('model_args') or {}).get('global_pool'), str):
        meta['global_pool'] = cfg['model_args']['global_pool']
    return meta


def _train_args_metadata(args: Dict[str, Any]) -> Dict[str, Any]:
    """What a timm train.py checkpoint's args record of the model it built.

    train.py builds the model with `--model-kwargs` (img_size=..., global_pool=...) and `--gp`; `--input-size` and
    `--img-size` size the data, which a fixed-size model must match. A `dynamic_img_size` model keeps the tables of
    the size it was built at, whatever the data's.
    """
    model_kwargs = args.get('model_kwargs') if isinstance(args.get('model_kwargs'), dict) else {}
    meta = {'architecture': args['model']} if isinstance(args.get('model'), str) else {}
    if model_kwargs.get('img_size') is not None:
        meta['img_size'] = parse_img_size(model_kwargs['img_size'], "the train.py checkpoint's --model-kwargs img_size")
    elif not model_kwargs.get('dynamic_img_size'):
        if args.get('input_size'):
            meta['img_size'] = parse_img_size(
                list(args['input_size'][-2:]), "the train.py checkpoint's --input-size")
        elif args.get('img_size'):
            meta['img_size'] = parse_img_size(args['img_size'], "the train.py checkpoint's --img-size")
    global_pool = model_kwargs.get('global_pool', args.get('gp'))
    if isinstance(global_pool, str):
        meta['global_pool'] = global_pool
    return meta


def _file_metadata(path: Path, contents: Any, header: Dict[str, str]) -> Dict[str, Any]:
    """What a checkpoint file records: its export's config.json, its safetensors header, or its train.py args."""
    meta = {}
    if path.name in EXPORT_WEIGHTS and (path.parent / 'config.json').is_file():
        meta = _config_metadata(path.parent / 'config.json')
    if 'img_size' in header:
        meta['img_size'] = parse_img_size(header['img_size'], f"The img_size entry of '{path}'s header")
    if meta or not isinstance(contents, dict):
        return meta
    return checkpoint_metadata(contents)


def checkpoint_metadata(
        checkpoint: Union[PathLike, Dict[str, Any], None],
) -> Dict[str, Any]:
    """What a checkpoint records of the model it was trained as: 'img_size' (H, W), 'global_pool', 'architecture'
    (and from an export 'in_chans', 'num_classes'), where it records them.

    Only the checkpoint's own record counts: a timm train.py checkpoint's args, the `img_size` entry of a
    safetensors header, or the config.json that `timm-cabvit export` (timm's `save_for_hf`) writes beside the
    weights it names model.safetensors / pytorch_model.bin; a config.json beside a file of another name belongs to
    something else. Of a file, only its header or args are read (memory-mapped), for a file that timm has loaded
    itself; `read_checkpoint` returns the same from the one read of a file it loads.
    """
    if checkpoint is None:
        return {}
    if isinstance(checkpoint, dict):
        args = checkpoint.get('args')
        args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
        return _train_args_metadata(args)
    path = Path(checkpoint)
    if not path.is_file():
        return {}
    with path.open('rb') as f:
        head = f.read(9)
    if _is_safetensors(path, head, path.stat().st_size):
        with safetensors.safe_open(path, 'pt') as f:
            return _file_metadata(path, None, f.metadata() or {})
    try:
        contents = _torch_load(path, mmap=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError):
        contents = None
    return _file_metadata(path, contents, {})


# Layouts

def unwrap_checkpoint(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint (EMA first, as timm), without the DDP and torch.compile key prefixes."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        while k.startswith(('module.', '_orig_mod.')):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


# Tables saved for other token grids

def _is_rel_pos_table(key: str) -> bool:
    """timm's RelPosBias table, (2H - 1) (2W - 1) + 3 offsets with class-token entries, not a row-major grid."""
    return key.endswith('relative_position_bias_table')


def fits_grids(state_dict: Dict[str, torch.Tensor], grids: Dict[str, Grid]) -> bool:
    """Whether every table of the checkpoint has as many entries as its grid under `grids`."""
    for key, (h, w) in grids.items():
        value = state_dict.get(key)
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            continue
        entries = value.shape[0] if _is_rel_pos_table(key) else value.shape[-1]
        if entries != ((2 * h - 1) * (2 * w - 1) + 3 if _is_rel_pos_table(key) else h * w):
            return False
    return True


def _square_img_size(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Optional[Grid]:
    """The square input size whose grid the model's first table would have, if its entry count is a square."""
    grids = model.table_grids()
    key = next((k for k in grids if isinstance(state_dict.get(k), torch.Tensor)), None)
    if key is None:
        return None
    value = state_dict[key]
    if _is_rel_pos_table(key):
        side = (math.isqrt(max(value.shape[0] - 3, 0)) + 1) // 2
    else:
        side = math.isqrt(value.shape[-1])
    stride = model.img_size[0] / grids[key][0]
    return (round(side * stride),) * 2 if side else None


def saved_img_size(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        img_size: Optional[Grid] = None,
) -> Optional[Grid]:
    """The input size a checkpoint was trained at, for the model's grid function to lay its tables out on.

    That size is `img_size` (the checkpoint's own record of it) where every table fits it, else the input size of
    the model's pretrained cfg, else a square size read from the tables. A table's entry count alone cannot tell
    a 16x12 grid from a 12x16 one: when nothing records the size and the tables fit the model's own non-square
    grids, they are taken as they are, with a warning. None if no size fits every table (the fit check reports).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    candidates = [img_size, tuple(cfg['input_size'][-2:]) if cfg.get('input_size') else None,
                  _square_img_size(state_dict, model)]
    for candidate in candidates:
        if candidate is not None and fits_grids(state_dict, model.table_grids(candidate)):
            return tuple(candidate)
    if not fits_grids(state_dict, model.table_grids()):
        return None
    height, width = model.img_size
    if height != width:
        warnings.warn(
            f'The checkpoint does not record the input size it was trained at, and its bias tables fit this '
            f'model\'s {height}x{width} grids but also others with as many tokens (e.g. {width}x{height}): loaded '
            f'as {height}x{width}. If it was trained at another size, pass it: '
            f'pretrained_cfg_overlay=dict(input_size=(3, H, W), ...).', stacklevel=3)
    return model.img_size


def resample_tables(
        state_dict: Dict[str, torch.Tensor],
        source_grids: Dict[str, Grid],
        target_grids: Dict[str, Grid],
) -> Dict[str, torch.Tensor]:
    """The state dict with every table resampled from its saved grid to the model's (bicubic, by grid shape)."""
    out = dict(state_dict)
    for key, new_grid in target_grids.items():
        value, old_grid = out.get(key), source_grids.get(key)
        if not isinstance(value, torch.Tensor) or old_grid is None or tuple(old_grid) == tuple(new_grid):
            continue
        if _is_rel_pos_table(key):
            out[key] = resize_rel_pos_table(value, old_grid, new_grid)
        else:
            out[key] = resize_token_grid(value, old_grid, new_grid)
    return out


# The fit check

def checkpoint_source(cfg: Dict[str, Any]) -> str:
    """Where timm's load_pretrained takes the weights from, in its order, for error messages."""
    if cfg.get('source') == 'hf-hub' and cfg.get('hf_hub_id'):
        return f"Hugging Face Hub repo '{cfg['hf_hub_id']}'"
    if cfg.get('file'):  # also where a loader read the file itself and passes its state dict
        return f"file '{cfg['file']}'"
    if cfg.get('state_dict') is not None:
        return 'the state dict given as pretrained_cfg state_dict'
    if cfg.get('hf_hub_id'):
        return f"Hugging Face Hub repo '{cfg['hf_hub_id']}'"
    return f"url '{cfg['url']}'" if cfg.get('url') else 'the given state dict'


def _names(cfg: Dict[str, Any], field: str) -> Tuple[str, ...]:
    names = cfg.get(field) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _listing(title: str, items: List[str], limit: int = 12) -> str:
    more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
    return f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(items[:limit]) + more if items else ''


def _check_classifier(state_dict: Dict[str, torch.Tensor], model: nn.Module, cfg: Dict[str, Any]) -> None:
    """Warn where timm's load_pretrained is about to drop the checkpoint's classifier, and say how to keep it."""
    for name in _names(cfg, 'classifier'):
        weight = state_dict.get(f'{name}.weight')
        num_classes = getattr(model, 'num_classes', 0)
        if not isinstance(weight, torch.Tensor) or not num_classes or num_classes == cfg.get('num_classes'):
            continue
        if weight.shape[0] == num_classes:
            warnings.warn(
                f"The checkpoint's classifier '{name}' has {num_classes} classes, as the model, but timm drops it "
                f"because the pretrained cfg says num_classes={cfg.get('num_classes')}: pass "
                f"pretrained_cfg_overlay=dict(num_classes={num_classes}, ...) to keep it (timm_cabvit.tools.hub."
                f"create_model(..., checkpoint=FILE) does).", stacklevel=3)
        else:
            warnings.warn(
                f"The checkpoint's classifier '{name}' ({weight.shape[0]} classes) is not loaded: the model has "
                f"{num_classes} classes, so its classifier starts from random weights (fine-tuning).", stacklevel=3)


def _hints(state_dict: Dict[str, torch.Tensor], model: nn.Module, cfg: Dict[str, Any], mismatched: List[str]) -> str:
    """How to build the model the checkpoint fits, for the mismatches a model argument explains."""
    hints = []
    for name in _names(cfg, 'classifier'):
        weight = state_dict.get(f'{name}.weight')
        if f'{name}.weight' in mismatched and isinstance(weight, torch.Tensor):
            hints.append(
                f'its classifier has {weight.shape[0]} classes, the model {model.num_classes}: create the model with '
                f'num_classes={weight.shape[0]} (to fine-tune for {model.num_classes} classes, load it as pretrained '
                f'weights: pretrained=True, pretrained_cfg_overlay=dict(file=FILE), which leaves the classifier out)')
    for name in _names(cfg, 'first_conv'):
        weight = state_dict.get(f'{name}.weight')
        if f'{name}.weight' in mismatched and isinstance(weight, torch.Tensor) and weight.ndim == 4:
            hints.append(f'its first conv takes {weight.shape[1]} input channels: create the model with '
                         f'in_chans={weight.shape[1]}')
    tables = [k for k in model.table_grids() if k in state_dict]
    if tables and 2 * sum(k in mismatched for k in tables) >= len(tables):  # not a table or two edited alone
        hints.append(
            'its bias tables are laid out for another input size, which it does not record and which is not a square '
            'one: create the model at the size it was trained at (img_size=(H, W); in timm\'s scripts '
            '--model-kwargs img_size="(H, W)"), or load the file with timm_cabvit.tools.hub.create_model(NAME, '
            'checkpoint=FILE), which reads the size a train.py checkpoint or an export records')
    return ''.join(f'\n  Hint: {h}.' for h in hints)


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, from the extremes (NaN and inf reach them): one pass and no mask, 10x faster
    than `isfinite().all()` on a model's weights."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(low.isfinite() and high.isfinite())


def check_fits(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        source: Optional[str] = None,
        strict: bool = True,
        pretrained: bool = True,
) -> Dict[str, torch.Tensor]:
    """The state dict, after checking it loads completely with finite floats.

    Raises a CheckpointMismatchError listing missing, unexpected (only if `strict`) and mismatched keys with their
    shapes, non-finite values and integer tensors where the model has floating point ones, with a hint where a
    model argument (num_classes, in_chans, img_size) explains them. For `pretrained` loads the classifier and first
    conv may differ: timm's load_pretrained drops or adapts them for another num_classes or in_chans.

    Args:
        state_dict: Our layout, tables on the model's grids.
        model: The model to load into.
        source: What the state dict is, for the message (default: the checkpoint of the model's pretrained cfg).
        strict: Whether missing and unexpected keys are errors, as in `load_state_dict`.
        pretrained: Whether timm's load_pretrained loads it (and adapts the classifier and first conv).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    target = model.state_dict()
    out = dict(state_dict)
    for k, v in target.items():
        if k.endswith('.num_batches_tracked') and k not in out:
            out[k] = v  # a counter, not a weight: older BatchNorm checkpoints lack it
    lenient = {f'{c}.{p}' for c in _names(cfg, 'classifier') for p in ('weight', 'bias')} if pretrained else set()
    first_convs = {f'{c}.weight' for c in _names(cfg, 'first_conv')} if pretrained else set()

    def fits(k: str, v: torch.Tensor) -> bool:
        shape, want = tuple(v.shape), tuple(target[k].shape)
        if shape == want or k in lenient:
            return True
        # another in_chans, adapted by timm's load_pretrained
        return k in first_convs and len(shape) == 4 and shape[:1] + shape[2:] == want[:1] + want[2:]

    missing = [k for k in target if k not in out and k not in lenient] if strict else []
    unexpected = [k for k in out if k not in target and k not in lenient] if strict else []
    mismatched = [k for k, v in out.items() if k in target and not (isinstance(v, torch.Tensor) and fits(k, v))]
    not_float = [
        f'{k}: {v.dtype}' for k, v in out.items()
        if k in target and isinstance(v, torch.Tensor) and target[k].is_floating_point() and not v.is_floating_point()]
    not_finite = [
        k for k, v in out.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != 'meta' and not _finite(v)]
    if missing or unexpected or mismatched or not_float or not_finite:
        model_desc = (
            f"{cfg.get('architecture') or type(model).__name__} (img_size {tuple(getattr(model, 'img_size', ()))}, "
            f"in_chans {getattr(model, 'in_chans', '?')}, num_classes {getattr(model, 'num_classes', '?')})")
        shapes = [f'{k}: checkpoint {tuple(getattr(out[k], "shape", ()))}, model {tuple(target[k].shape)}'
                  for k in mismatched]
        raise CheckpointMismatchError(
            f'{source or "The checkpoint from " + checkpoint_source(cfg)} does not fit {model_desc}: loading it '
            f'would leave weights missing, unused or wrong.'
            + _listing('missing from the checkpoint', missing)
            + _listing('not in the model', unexpected)
            + _listing('other shape', shapes)
            + _listing('integer where the model has floating point (a quantized or corrupt checkpoint?)', not_float)
            + _listing('NaN or infinite values (a diverged or corrupt checkpoint)', not_finite)
            + _hints(out, model, cfg, mismatched)
            + '\nCreate the model the checkpoint was trained as (its architecture and model_args), or pick the '
              'checkpoint of this model.')
    if pretrained:
        _check_classifier(out, model, cfg)
    return out
