"""Deployment of CabViT models: ONNX, torch.export and TorchScript, each checked against PyTorch.

The models are fixed-size, like timm's LeViT: the position and depth bias tables are sized for the token grids
of the model's `img_size`, so every export has a fixed image size; the batch dimension may be dynamic. For
another size, create the model with that `img_size` (the learned tables are resampled on load) and export that.

Exports start from a copy of the model in eval mode, re-parameterised by `timm.utils.reparameterize_model`
(BatchNorm folded into the convolutions that have a `fuse()`), after one forward pass that materialises the
attention biases (the eval-mode cache of `CrossBlockAttention`), so torch.export takes them as constants.

ONNX goes through the TorchScript-based exporter of `torch.onnx.export` (`dynamo=False`) unless asked otherwise,
as timm's own `timm.utils.onnx_export` does. Both exporters give graphs that match PyTorch to ~1e-6 and run
equally fast in ONNX Runtime, but the torch.export-based one (`dynamo=True`, torch's default since 2.9) takes
5-10 times longer to export these models (20-45 s against 2-7 s on two CPU cores) and needs `onnxscript`.
The TorchScript-based exporter is deprecated (a DeprecationWarning, silenced here), and so are `torch.jit.script`,
`save` and `load` (FutureWarnings, left visible): both still work with torch 2.14 and are kept because timm's
users and tools expect them.
"""
import copy
import io
import os
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.utils import reparameterize_model

from .hub import create_model

__all__ = ['export_onnx', 'export_program', 'export_torchscript', 'prepare_model', 'model_input_size']

ModelOrName = Union[nn.Module, str]
ImgSize = Union[int, Tuple[int, int]]
PathLike = Union[str, os.PathLike]

MIN_OPSET = 17
DEFAULT_OPSET = 18  # the lowest the torch.export-based exporter writes; the TorchScript-based one goes up to 20
ATOL = 1e-4


def model_input_size(model: nn.Module) -> Tuple[int, int]:
    """The (H, W) a model was built for: `img_size` of CabViT models, the pretrained cfg's for other timm models."""
    img_size = getattr(model, 'img_size', None)
    if img_size is None:
        img_size = model.pretrained_cfg['input_size'][-2:]
    return to_2tuple(img_size)


def prepare_model(
        model_or_name: ModelOrName,
        img_size: Optional[ImgSize] = None,
        reparameterize: bool = True,
        checkpoint: Optional[PathLike] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The model to export: an eval-mode copy, re-parameterised, with its attention biases materialised.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        img_size: Input size; None for the model's own (224 for a name). A given model with an `img_size` of its
            own (a fixed-size model) must have been built for it.
        reparameterize: Fold BatchNorms into convolutions (`timm.utils.reparameterize_model`).
        checkpoint: Weights to load into a model created from its name (any layout `checkpoint_filter_fn` reads).
        device: Device of the copy, None for the model's.
        dtype: Floating point type of the copy, None for the model's.
    """
    return _prepare(model_or_name, img_size, reparameterize, checkpoint, device, dtype)[0]


def _prepare(
        model_or_name: ModelOrName,
        img_size: Optional[ImgSize],
        reparameterize: bool,
        checkpoint: Optional[PathLike],
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> Tuple[nn.Module, int, Tuple[int, int]]:
    """`prepare_model`, the number of parameters before re-parameterisation, and the input size."""
    if isinstance(model_or_name, str):
        kwargs = {} if img_size is None else {'img_size': to_2tuple(img_size)}
        model = create_model(model_or_name, checkpoint=checkpoint, **kwargs)
    else:
        if checkpoint is not None:
            raise ValueError('checkpoint= loads weights into a model created by name; load them into a given model')
        fixed_size = getattr(model_or_name, 'img_size', None)
        if img_size is not None and fixed_size is not None and to_2tuple(img_size) != to_2tuple(fixed_size):
            raise ValueError(
                f'The model was built for {model_input_size(model_or_name)} images, not {to_2tuple(img_size)}: '
                f'its bias tables are sized for that grid. Create it with img_size={to_2tuple(img_size)} '
                f'or call set_input_size() first.')
        model = copy.deepcopy(model_or_name)
    img_size = model_input_size(model) if img_size is None else to_2tuple(img_size)
    model = model.to(device=device, dtype=dtype).eval()
    params_before = _num_params(model)
    if reparameterize:
        model = reparameterize_model(model, inplace=True)
    with torch.no_grad():
        model(_example_input(model, 1, img_size))
    return model, params_before, img_size


def _example_input(model: nn.Module, batch_size: int, img_size: Tuple[int, int]) -> torch.Tensor:
    """Random images of the model's channels, device and dtype."""
    param = next(model.parameters())
    in_chans = getattr(model, 'in_chans', 3)
    return torch.randn(batch_size, in_chans, *img_size, device=param.device, dtype=param.dtype)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trace_batch_size(batch_size: int, dynamic_batch: bool) -> int:
    """torch.export specialises dimensions of size 0 and 1: a dynamic batch is traced with at least 2 images."""
    return max(batch_size, 2) if dynamic_batch else batch_size


def _check_batch_sizes(batch_size: int, dynamic_batch: bool) -> Tuple[int, ...]:
    """Batch sizes a check runs: the traced one and, for a dynamic batch, one it was not traced with."""
    return (batch_size, batch_size + 2) if dynamic_batch else (batch_size,)


def _max_abs_diff(
        model: nn.Module,
        run: Callable[[torch.Tensor], torch.Tensor],
        batch_sizes: Sequence[int],
        img_size: Tuple[int, int],
) -> float:
    """Largest absolute difference between the model's outputs and `run`'s on random images of each batch size."""
    diff = 0.
    with torch.no_grad():
        for batch_size in batch_sizes:
            x = _example_input(model, batch_size, img_size)
            out = torch.as_tensor(run(x)).to(x.device)
            diff = max(diff, (out.float() - model(x).float()).abs().max().item())
    return diff


def _raise_if_over(diff: float, atol: float, what: str) -> None:
    if not diff < atol:
        raise RuntimeError(f'{what} differs from PyTorch by up to {diff:.3g}, more than the tolerance {atol:g}')


def _report(
        model: nn.Module, img_size: Tuple[int, int], params_before: int, reparameterize: bool, dynamic_batch: bool,
) -> Dict[str, Any]:
    return {
        'img_size': img_size,
        'dynamic_batch': dynamic_batch,
        'reparameterized': reparameterize,
        'params_before': params_before,
        'params': _num_params(model),
    }


def export_onnx(
        model_or_name: ModelOrName,
        path: PathLike,
        img_size: Optional[ImgSize] = None,
        batch_size: int = 1,
        opset: int = DEFAULT_OPSET,
        dynamic_batch: bool = True,
        reparameterize: bool = True,
        check: bool = True,
        checkpoint: Optional[PathLike] = None,
        dynamo: bool = False,
        atol: float = ATOL,
) -> Dict[str, Any]:
    """Export a model to ONNX with a fixed image size and, by default, a dynamic batch, and check it.

    The image size is fixed because the attention bias tables are sized for the model's token grids (see the
    module doc). The graph is exported from a float32 copy on the CPU; the check runs it in ONNX Runtime (CPU)
    on random images of `batch_size` and, for a dynamic batch, `batch_size + 2`, against PyTorch.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        path: The .onnx file to write.
        img_size: Input size; None for the model's own (224 for a name).
        batch_size: Batch size of the check and, with `dynamic_batch=False`, of the graph.
        opset: ONNX opset, 17 or newer (18 or newer with `dynamo=True`).
        dynamic_batch: Make the batch dimension of input and output dynamic.
        reparameterize: Fold BatchNorms into convolutions first.
        check: Run the ONNX checker and compare ONNX Runtime's outputs with PyTorch's.
        checkpoint: Weights to load into a model created from its name.
        dynamo: Use the torch.export-based exporter instead of the TorchScript-based one.
        atol: Largest absolute difference from PyTorch the check accepts.

    Returns:
        What was exported (path, img_size, opset, exporter, dynamic_batch, reparameterized, params_before and
        params) and, when checked, max_abs_diff and the batch_sizes it was measured at.
    """
    min_opset = DEFAULT_OPSET if dynamo else MIN_OPSET
    if opset < min_opset:
        raise ValueError(f'opset must be {min_opset} or newer for this exporter, got {opset}')
    model, params_before, img_size = _prepare(
        model_or_name, img_size, reparameterize, checkpoint, device=torch.device('cpu'), dtype=torch.float32)
    x = _example_input(model, _trace_batch_size(batch_size, dynamic_batch), img_size)
    path = os.fspath(path)
    export_args = dict(input_names=['input'], output_names=['output'], opset_version=opset, dynamo=dynamo)
    if dynamo:
        dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
        torch.onnx.export(model, (x,), path, dynamic_shapes=dynamic_shapes, verbose=False, **export_args)
    else:
        dynamic_axes = {'input': {0: 'batch'}, 'output': {0: 'batch'}} if dynamic_batch else None
        with warnings.catch_warnings():
            # the input check compares shapes that the fixed image size makes constants, as intended
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx')
            warnings.filterwarnings('ignore', message='You are using the legacy TorchScript-based ONNX export')
            warnings.filterwarnings('ignore', message='Constant folding - Only steps=1 can be constant folded')
            torch.onnx.export(model, (x,), path, dynamic_axes=dynamic_axes, **export_args)

    report = {'path': path, 'opset': opset, 'exporter': 'dynamo' if dynamo else 'torchscript',
              **_report(model, img_size, params_before, reparameterize, dynamic_batch)}
    if check:
        import onnx
        import onnxruntime

        onnx.checker.check_model(path, full_check=True)
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        input_name = session.get_inputs()[0].name
        batch_sizes = _check_batch_sizes(batch_size, dynamic_batch)
        diff = _max_abs_diff(model, lambda t: session.run(None, {input_name: t.numpy()})[0], batch_sizes, img_size)
        _raise_if_over(diff, atol, f'The ONNX graph {path}')
        report.update(max_abs_diff=diff, batch_sizes=batch_sizes)
    return report


def export_program(
        model_or_name: ModelOrName,
        img_size: Optional[ImgSize] = None,
        path: Optional[PathLike] = None,
        dynamic_batch: bool = True,
        reparameterize: bool = True,
        check: bool = True,
        checkpoint: Optional[PathLike] = None,
        atol: float = ATOL,
) -> Dict[str, Any]:
    """Export a model with `torch.export.export`, fixed image size and, by default, a dynamic batch, and check it.

    The program is saved with `torch.export.save` (to `path`, else to memory) and loaded back; the check compares
    the loaded program with PyTorch on random images of batch 1 and, for a dynamic batch, 3. It keeps the model's
    device and dtype. The attention biases are constants of the program.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        img_size: Input size; None for the model's own (224 for a name).
        path: The .pt2 file to write; None for none.
        dynamic_batch: Make the batch dimension dynamic.
        reparameterize: Fold BatchNorms into convolutions first.
        check: Compare the outputs of the saved and loaded program with PyTorch's.
        checkpoint: Weights to load into a model created from its name.
        atol: Largest absolute difference from PyTorch the check accepts.

    Returns:
        The loaded program ('program'), img_size, dynamic_batch, reparameterized, params_before, params and,
        when checked, max_abs_diff and the batch_sizes it was measured at.
    """
    model, params_before, img_size = _prepare(model_or_name, img_size, reparameterize, checkpoint)
    x = _example_input(model, _trace_batch_size(1, dynamic_batch), img_size)
    dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
    program = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    file = io.BytesIO() if path is None else os.fspath(path)
    torch.export.save(program, file)
    if path is None:
        file.seek(0)
    program = torch.export.load(file)

    report = {'program': program, **_report(model, img_size, params_before, reparameterize, dynamic_batch)}
    if path is not None:
        report['path'] = os.fspath(path)
    if check:
        batch_sizes = _check_batch_sizes(1, dynamic_batch)
        diff = _max_abs_diff(model, program.module(), batch_sizes, img_size)
        _raise_if_over(diff, atol, 'The exported program')
        report.update(max_abs_diff=diff, batch_sizes=batch_sizes)
    return report


def export_torchscript(
        model_or_name: ModelOrName,
        img_size: Optional[ImgSize] = None,
        path: Optional[PathLike] = None,
        reparameterize: bool = True,
        check: bool = True,
        checkpoint: Optional[PathLike] = None,
        atol: float = ATOL,
) -> Dict[str, Any]:
    """Script a model with `torch.jit.script`, save it (to `path`, else to memory), load it back and check it.

    The check compares the loaded module with PyTorch on random images of batch 1 and 3. It keeps the model's
    device and dtype.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        img_size: Input size; None for the model's own (224 for a name).
        path: The .pt file to write; None for none.
        reparameterize: Fold BatchNorms into convolutions first.
        check: Compare the outputs of the saved and loaded module with PyTorch's.
        checkpoint: Weights to load into a model created from its name.
        atol: Largest absolute difference from PyTorch the check accepts.

    Returns:
        The loaded module ('module'), img_size, reparameterized, params_before, params and, when checked,
        max_abs_diff and the batch_sizes it was measured at.
    """
    model, params_before, img_size = _prepare(model_or_name, img_size, reparameterize, checkpoint)
    file = io.BytesIO() if path is None else os.fspath(path)
    torch.jit.save(torch.jit.script(model), file)
    if path is None:
        file.seek(0)
    module = torch.jit.load(file, map_location=next(model.parameters()).device)

    report = {'module': module, **_report(model, img_size, params_before, reparameterize, dynamic_batch=True)}
    if path is not None:
        report['path'] = os.fspath(path)
    if check:
        batch_sizes = _check_batch_sizes(1, dynamic_batch=True)
        diff = _max_abs_diff(model, module, batch_sizes, img_size)
        _raise_if_over(diff, atol, 'The TorchScript module')
        report.update(max_abs_diff=diff, batch_sizes=batch_sizes)
    return report
