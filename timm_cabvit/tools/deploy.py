"""Deployment of CabViT models: ONNX, torch.export and TorchScript, each checked against PyTorch.

The models are fixed-size, like timm's LeViT: the position and depth bias tables are sized for the token grids
of the model's `img_size`, so every export has a fixed image size; the batch dimension may be dynamic. For
another size, create the model with that `img_size` (the learned tables are resampled on load) and export that.

Exports start from a copy of the model in eval mode, re-parameterised by `timm.utils.reparameterize_model`
(BatchNorm folded into the convolutions that have a `fuse()`). The attention biases are functions of the
parameters only, so ONNX Runtime folds them into constants when it loads a graph.

ONNX goes through the TorchScript-based exporter of `torch.onnx.export` (`dynamo=False`) at opset 20 unless asked
otherwise, as timm's own `timm.utils.onnx_export` does, with the ConvNeXt blocks' MLPs as 1x1 convolutions
(`convnext_mlps_as_convolutions`), which ONNX Runtime runs as NCHWc convolutions: 6-9 % less time for cabvit_h_l1
and h_l2 than the Linear form at opset 18 (2 threads, benchmarks/cpu_latency.py). The torch.export-based exporter
(`dynamo=True`, torch's default since 2.9) at opset 23 writes attention as ONNX's Attention node, which ONNX Runtime
runs fused: about 6 % less again for cabvit_h_l1 at 2 threads (none at 1), none for h_l2; it takes 3-5 times
longer to export these models (11-14 s against 2-4 s for cabvit_h_l1 on two CPU cores) and needs `onnxscript`.
The TorchScript-based exporter is deprecated (a DeprecationWarning, silenced here), and so are `torch.jit.script`,
`save` and `load` (FutureWarnings, left visible): both still work with torch 2.14 and are kept because timm's
users and tools expect them.

Every check compares the export with PyTorch, the model as given in eval mode (neither folded nor, for a
`dynamic_img_size` model exported at another size, resampled), on random images and reports the largest absolute
difference, the largest output and their ratio. In eval mode a freshly initialised CabViT-H model's outputs nearly
vanish (~1e-20: each TME enhance conv shrinks activations at the BatchNorms' initial statistics), so a check of a
random model would compare zeros: it is refused, and a model created by name without a checkpoint gets its
statistics from `calibrate_batchnorm` first, the activation scale of a trained one.
"""
import copy
import io
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ConvMlp, LayerNorm2d, to_2tuple
from timm.models._features import FeatureGetterNet
from timm.models.convnext import ConvNeXtBlock
from timm.utils import reparameterize_model

from ..layers import batchnorm_momentum
from .flops import num_params
from .hub import create_model

__all__ = [
    'ExportCheckError', 'calibrate_batchnorm', 'convnext_mlps_as_convolutions', 'export_onnx', 'export_program',
    'export_torchscript', 'model_input_size', 'onnx_opset_range', 'prepare_model', 'require_onnx',
]

ModelOrName = Union[nn.Module, str]
ImgSize = Union[int, Tuple[int, int]]
PathLike = Union[str, os.PathLike]

MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18  # the lowest the torch.export-based exporter writes
DEFAULT_OPSET = 20  # torch's default: the newest the TorchScript-based exporter writes (GELU as one Gelu node)
ATOL = 1e-4
# Outputs of at most this size make an export check meaningless (a random CabViT-H model's are ~1e-20).
VANISHING_OUTPUT = 1e-6
CALIBRATION_BATCHES = 2  # batches of 8 random images that set a random model's BatchNorm statistics


class ExportCheckError(RuntimeError):
    """An export whose outputs differ from PyTorch's by more than the tolerance."""


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside timm's feature wrapper (a CabViT `features_only` backbone), else the model itself."""
    return model.model if isinstance(model, FeatureGetterNet) else model


def model_input_size(model: nn.Module) -> Tuple[int, int]:
    """The (H, W) a model was built for: `img_size` of CabViT models and their `features_only` backbones, the
    pretrained cfg's for other timm models."""
    img_size = getattr(_unwrapped(model), 'img_size', None)
    if img_size is None:
        img_size = model.pretrained_cfg['input_size'][-2:]
    return to_2tuple(img_size)


@torch.no_grad()
def calibrate_batchnorm(
        model: nn.Module,
        batches: Union[int, Iterable[torch.Tensor]] = 4,
        img_size: Optional[ImgSize] = None,
        batch_size: int = 8,
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics as the plain average over some batches; the model in eval.

    Freshly initialised, the CabViT-H models shrink their activations ~16-fold in every eval-mode TME enhance conv
    (unit running variance behind a depthwise conv of std 0.02 weights, no residual), to ~1e-20 at the output of
    cabvit_h_l3: nothing like a trained model, and a comparison of two runs of it (an export check) would compare
    near-zero outputs. Calibrated on random images, a random model's activations have the scale of a trained one's.
    After training ("precise BN"), the same on training batches gives statistics of the final weights.

    Args:
        model: Any model; one without BatchNorm is only put in eval mode.
        batches: Input batches (on any device: moved to the model's; run under the caller's autocast, if any), or
            the number of batches of random images. No batch at all leaves the statistics as they are.
        img_size: Size of the random images; None for the model's own (`model_input_size`).
        batch_size: Images per random batch.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if isinstance(batches, int):
        size = model_input_size(model) if img_size is None else to_2tuple(img_size)
        batches = (_example_input(model, batch_size, size) for _ in range(batches))
    batches = iter(batches)
    first = next(batches, None) if norms else None
    if first is not None:
        param = next(model.parameters())
        for norm in norms:
            norm.reset_running_stats()
        model.train()
        with batchnorm_momentum(model, None):  # a cumulative average over the batches
            for x in itertools.chain([first], batches):
                model(x.to(device=param.device, dtype=param.dtype))
    return model.eval()


def onnx_opset_range(dynamo: bool = False) -> Tuple[int, int]:
    """The ONNX opsets the installed torch's exporter writes for these models: (lowest, highest)."""
    from torch.onnx import _constants

    if dynamo:
        return DYNAMO_MIN_OPSET, getattr(_constants, 'ONNX_MAX_OPSET', DYNAMO_MIN_OPSET)
    highest = getattr(_constants, 'ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET', getattr(_constants, 'ONNX_MAX_OPSET', 20))
    return MIN_OPSET, highest


def require_onnx(dynamo: bool = False) -> Tuple[Any, Any]:
    """onnx and onnxruntime (for the check), or an ImportError naming the extra that installs them."""
    names = ('onnx', 'onnxruntime', 'onnxscript') if dynamo else ('onnx', 'onnxruntime')
    modules = []
    for name in names:
        try:
            modules.append(__import__(name))
        except ImportError as e:
            install = 'pip install onnxscript' if name == 'onnxscript' else 'pip install "timm-cabvit[onnx]"'
            raise ImportError(
                f'ONNX export{" with dynamo=True" if dynamo else ""} and its check need {", ".join(names)}, but '
                f'{name} is not installed: {install}', name=name) from e
    return modules[0], modules[1]


def prepare_model(
        model_or_name: ModelOrName,
        img_size: Optional[ImgSize] = None,
        reparameterize: bool = True,
        checkpoint: Optional[PathLike] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """The model to export: an eval-mode copy, re-parameterised.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create; created without a checkpoint, its
            random weights get BatchNorm statistics calibrated on random images (`calibrate_batchnorm`).
        img_size: Input size; None for the model's own (224 for a name). A given fixed-size model must have been
            built for it; a `dynamic_img_size` model is exported at it, its copy's tables resampled to that size
            as its forward pass would (`set_input_size`).
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
) -> Tuple[nn.Module, nn.Module, int, Tuple[int, int]]:
    """`prepare_model`, the model its export is checked against, the number of parameters before
    re-parameterisation, and the input size.

    The check's reference is the model as given (or created), in eval mode on the export's device and dtype, neither
    folded nor resampled: an export of a `dynamic_img_size` model at another size is compared with what that model
    computes at that size, not with the copy whose tables were resampled for the export.
    """
    if isinstance(model_or_name, str):
        kwargs = {} if img_size is None else {'img_size': to_2tuple(img_size)}
        reference = create_model(model_or_name, checkpoint=checkpoint, **kwargs)
        if checkpoint is None:  # random weights: outputs worth comparing need calibrated statistics
            calibrate_batchnorm(reference, CALIBRATION_BATCHES)
        other_size = False  # created at that size
    else:
        if checkpoint is not None:
            raise ValueError('checkpoint= loads weights into a model created by name; load them into a given model')
        own_size = getattr(_unwrapped(model_or_name), 'img_size', None)
        other_size = img_size is not None and own_size is not None and to_2tuple(img_size) != to_2tuple(own_size)
        if other_size and not getattr(_unwrapped(model_or_name), 'dynamic_img_size', False):
            raise ValueError(
                f'The model was built for {model_input_size(model_or_name)} images, not {to_2tuple(img_size)}: '
                f'its bias tables are sized for that grid. Create it with img_size={to_2tuple(img_size)} '
                f'or call set_input_size() first.')
        reference = copy.deepcopy(model_or_name)
    img_size = model_input_size(reference) if img_size is None else to_2tuple(img_size)
    reference = reference.to(device=device, dtype=dtype).eval()
    model = copy.deepcopy(reference)
    if other_size:  # a dynamic model: the tables it resamples to at that size, resampled once
        _unwrapped(model).set_input_size(img_size)
    params_before = num_params(model)
    if reparameterize:
        model = reparameterize_model(model, inplace=True)
    return model, reference, params_before, img_size


@torch.no_grad()
def convnext_mlps_as_convolutions(model: nn.Module) -> nn.Module:
    """The model with each timm ConvNeXt block's LayerNorm and Linear MLP on permuted maps replaced by LayerNorm2d
    and 1x1 convolutions on NCHW maps (timm's `conv_mlp=True` form): the same function, which ONNX Runtime runs as
    its NCHWc convolutions without the two transposes per block. Changes the model in place and returns it.
    """
    for block in model.modules():
        if not isinstance(block, ConvNeXtBlock) or block.use_conv_mlp or not isinstance(block.norm, nn.LayerNorm):
            continue
        dd = {'device': block.mlp.fc1.weight.device, 'dtype': block.mlp.fc1.weight.dtype}
        norm = LayerNorm2d(block.norm.normalized_shape[0], eps=block.norm.eps, **dd)
        norm.load_state_dict(block.norm.state_dict())
        fc1, fc2 = block.mlp.fc1, block.mlp.fc2
        mlp = ConvMlp(fc1.in_features, fc1.out_features, fc2.out_features, **dd)
        mlp.act = block.mlp.act
        for conv, linear in ((mlp.fc1, fc1), (mlp.fc2, fc2)):
            conv.weight.copy_(linear.weight[:, :, None, None])
            conv.bias.copy_(linear.bias)
        block.norm, block.mlp, block.use_conv_mlp = norm, mlp, True
    return model


def _example_input(model: nn.Module, batch_size: int, img_size: Tuple[int, int]) -> torch.Tensor:
    """Random images of the model's channels, device and dtype."""
    param = next(model.parameters())
    in_chans = getattr(_unwrapped(model), 'in_chans', 3)
    return torch.randn(batch_size, in_chans, *img_size, device=param.device, dtype=param.dtype)


def _trace_batch_size(batch_size: int, dynamic_batch: bool) -> int:
    """torch.export specialises dimensions of size 0 and 1: a dynamic batch is traced with at least 2 images."""
    return max(batch_size, 2) if dynamic_batch else batch_size


def _check_batch_sizes(batch_size: int, dynamic_batch: bool) -> Tuple[int, ...]:
    """Batch sizes a check runs: the traced one and, for a dynamic batch, one it was not traced with."""
    return (batch_size, batch_size + 2) if dynamic_batch else (batch_size,)


def _outputs(out: Any) -> List[torch.Tensor]:
    """The outputs of a model or an export as tensors: the logits, or the maps of a `features_only` backbone."""
    return [torch.as_tensor(o) for o in out] if isinstance(out, (list, tuple)) else [torch.as_tensor(out)]


def _check(
        reference: nn.Module,
        run: Callable[[torch.Tensor], Any],
        batch_sizes: Sequence[int],
        img_size: Tuple[int, int],
        atol: float,
        what: str,
) -> Dict[str, Any]:
    """Compare `run` with the reference model (see `_prepare`) on random images of each batch size; raise if an
    output differs in shape, or by `atol` or more.

    Returns max_abs_diff, max_abs_output (the largest PyTorch output, for scale), max_rel_diff (their ratio) and
    the batch_sizes compared.
    """
    diff, scale = 0., 0.
    with torch.no_grad():
        for batch_size in batch_sizes:
            x = _example_input(reference, batch_size, img_size)
            refs, outs = _outputs(reference(x)), _outputs(run(x))
            if [o.shape for o in outs] != [r.shape for r in refs]:
                raise ExportCheckError(
                    f'{what} gives outputs of shapes {[tuple(o.shape) for o in outs]}, PyTorch '
                    f'{[tuple(r.shape) for r in refs]}')
            for ref, out in zip(refs, outs):
                diff = max(diff, (out.to(x.device).float() - ref.float()).abs().max().item())
                scale = max(scale, ref.float().abs().max().item())
    if not diff < atol:
        raise ExportCheckError(f'{what} differs from PyTorch by up to {diff:.3g}, more than the tolerance {atol:g}')
    if scale <= VANISHING_OUTPUT:
        raise ExportCheckError(
            f'{what} was checked on outputs of at most {scale:.1e}, which says nothing: the model\'s outputs vanish, '
            f'as a random CabViT-H model\'s do at its initial BatchNorm statistics. Load trained weights or '
            f'calibrate them first (timm_cabvit.tools.deploy.calibrate_batchnorm(model)), or pass check=False.')
    return dict(max_abs_diff=diff, max_abs_output=scale, max_rel_diff=diff / scale if scale else float('inf'),
                batch_sizes=tuple(batch_sizes))


def _save_load_check(
        reference: nn.Module,
        exported: Any,
        save: Callable[[Any, Any], None],
        load: Callable[[Any], Any],
        path: Optional[PathLike],
        check: bool,
        atol: float,
        what: str,
        report: Dict[str, Any],
        run: Callable[[Any], Callable[[torch.Tensor], torch.Tensor]] = lambda loaded: loaded,
) -> Tuple[Any, Dict[str, Any]]:
    """Save an export (to `path`, else to memory), load it back and check the loaded one against the reference.

    Returns the loaded export and the report with its path and, when checked, the comparison (`_check`) at
    batch 1 and, for a dynamic batch, 3.
    """
    file = io.BytesIO() if path is None else os.fspath(path)
    save(exported, file)
    if path is None:
        file.seek(0)
    loaded = load(file)
    if path is not None:
        report['path'] = os.fspath(path)
    if check:
        batch_sizes = _check_batch_sizes(1, report['dynamic_batch'])
        report.update(_check(reference, run(loaded), batch_sizes, report['img_size'], atol, what))
    return loaded, report


def _report(
        model: nn.Module, img_size: Tuple[int, int], params_before: int, reparameterize: bool, dynamic_batch: bool,
) -> Dict[str, Any]:
    return {
        'img_size': img_size,
        'dynamic_batch': dynamic_batch,
        'reparameterized': reparameterize,
        'params_before': params_before,
        'params': num_params(model),
    }


def export_onnx(
        model_or_name: ModelOrName,
        path: PathLike,
        *,
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
    on random images of `batch_size` and, for a dynamic batch, `batch_size + 2`, against PyTorch. Its input is
    'input', its output 'output', or 'output0', 'output1', ... for the maps of a `features_only` backbone.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        path: The .onnx file to write.
        img_size: Input size; None for the model's own (224 for a name).
        batch_size: Batch size of the check and, with `dynamic_batch=False`, of the graph.
        opset: ONNX opset, 17 to 20 (18 to 23 with `dynamo=True`, where 23 writes the Attention node).
        dynamic_batch: Make the batch dimension of input and output dynamic.
        reparameterize: Fold BatchNorms into convolutions first.
        check: Run the ONNX checker and compare ONNX Runtime's outputs with PyTorch's.
        checkpoint: Weights to load into a model created from its name.
        dynamo: Use the torch.export-based exporter instead of the TorchScript-based one.
        atol: Largest absolute difference from PyTorch the check accepts.

    Returns:
        What was exported (path, img_size, opset, exporter, dynamic_batch, reparameterized, params_before and
        params) and, when checked, max_abs_diff, max_abs_output (the largest PyTorch output), max_rel_diff (their
        ratio) and the batch_sizes compared. A model at its initial weights has near-zero outputs in eval mode,
        which makes the check say little: calibrate its BatchNorms first (`calibrate_batchnorm`).
    """
    lowest, highest = onnx_opset_range(dynamo)
    if not lowest <= opset <= highest:
        raise ValueError(
            f'opset must be {lowest} or newer for this exporter, and at most {highest} (the newest torch '
            f'{torch.__version__.split("+")[0]} writes), got {opset}')
    onnx, onnxruntime = require_onnx(dynamo) if check or dynamo else (None, None)
    model, reference, params_before, img_size = _prepare(
        model_or_name, img_size, reparameterize, checkpoint, device=torch.device('cpu'), dtype=torch.float32)
    graph_model = convnext_mlps_as_convolutions(copy.deepcopy(model))
    x = _example_input(model, _trace_batch_size(batch_size, dynamic_batch), img_size)
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        num_outputs = len(_outputs(model(x)))  # a features_only backbone gives one map per feature level
    output_names = ['output'] if num_outputs == 1 else [f'output{i}' for i in range(num_outputs)]
    export_args = dict(input_names=['input'], output_names=output_names, opset_version=opset, dynamo=dynamo)
    if dynamo:
        dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
        torch.onnx.export(graph_model, (x,), path, dynamic_shapes=dynamic_shapes, verbose=False, **export_args)
    else:
        dynamic_axes = {name: {0: 'batch'} for name in ['input', *output_names]} if dynamic_batch else None
        with warnings.catch_warnings():
            # the input check compares shapes that the fixed image size makes constants, as intended
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx')
            warnings.filterwarnings('ignore', message='You are using the legacy TorchScript-based ONNX export')
            warnings.filterwarnings('ignore', message='Constant folding - Only steps=1 can be constant folded')
            torch.onnx.export(graph_model, (x,), path, dynamic_axes=dynamic_axes, **export_args)

    report = {'path': path, 'opset': opset, 'exporter': 'dynamo' if dynamo else 'torchscript',
              **_report(model, img_size, params_before, reparameterize, dynamic_batch)}
    if check:
        onnx.checker.check_model(path, full_check=True)
        session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
        input_name = session.get_inputs()[0].name
        report.update(_check(
            reference, lambda t: session.run(None, {input_name: t.numpy()}),
            _check_batch_sizes(batch_size, dynamic_batch), img_size, atol, f'The ONNX graph {path}'))
    return report


def export_program(
        model_or_name: ModelOrName, path: Optional[PathLike] = None, *, img_size: Optional[ImgSize] = None,
        dynamic_batch: bool = True, reparameterize: bool = True, check: bool = True,
        checkpoint: Optional[PathLike] = None, atol: float = ATOL,
) -> Dict[str, Any]:
    """Export a model with `torch.export.export`, fixed image size and, by default, a dynamic batch, and check it.

    The program is saved with `torch.export.save` (to `path`, else to memory) and loaded back; the check compares
    the loaded program with PyTorch on random images of batch 1 and, for a dynamic batch, 3. It keeps the model's
    device and dtype. The attention biases are constants of the program.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        path: The .pt2 file to write; None for none.
        img_size: Input size; None for the model's own (224 for a name).
        dynamic_batch: Make the batch dimension dynamic.
        reparameterize: Fold BatchNorms into convolutions first.
        check: Compare the outputs of the saved and loaded program with PyTorch's.
        checkpoint: Weights to load into a model created from its name.
        atol: Largest absolute difference from PyTorch the check accepts.

    Returns:
        The loaded program ('program'), img_size, dynamic_batch, reparameterized, params_before, params and,
        when checked, max_abs_diff, max_abs_output, max_rel_diff and the batch_sizes compared.
    """
    model, reference, params_before, img_size = _prepare(model_or_name, img_size, reparameterize, checkpoint)
    x = _example_input(model, _trace_batch_size(1, dynamic_batch), img_size)
    dynamic_shapes = ({0: torch.export.Dim('batch')},) if dynamic_batch else None
    program, report = _save_load_check(
        reference, torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes), torch.export.save,
        torch.export.load, path, check, atol, 'The exported program',
        _report(model, img_size, params_before, reparameterize, dynamic_batch), run=lambda p: p.module())
    return {'program': program, **report}


def export_torchscript(
        model_or_name: ModelOrName, path: Optional[PathLike] = None, *, img_size: Optional[ImgSize] = None,
        reparameterize: bool = True, check: bool = True, checkpoint: Optional[PathLike] = None, atol: float = ATOL,
) -> Dict[str, Any]:
    """Script a model with `torch.jit.script`, save it (to `path`, else to memory), load it back and check it.

    The check compares the loaded module with PyTorch on random images of batch 1 and 3. It keeps the model's
    device and dtype.

    Args:
        model_or_name: A model (left as it is) or a timm model name to create.
        path: The .pt file to write; None for none.
        img_size: Input size; None for the model's own (224 for a name).
        reparameterize: Fold BatchNorms into convolutions first.
        check: Compare the outputs of the saved and loaded module with PyTorch's.
        checkpoint: Weights to load into a model created from its name.
        atol: Largest absolute difference from PyTorch the check accepts.

    Returns:
        The loaded module ('module'), img_size, reparameterized, params_before, params and, when checked,
        max_abs_diff, max_abs_output, max_rel_diff and the batch_sizes compared.
    """
    model, reference, params_before, img_size = _prepare(model_or_name, img_size, reparameterize, checkpoint)
    device = next(model.parameters()).device
    module, report = _save_load_check(
        reference, torch.jit.script(model), torch.jit.save, lambda f: torch.jit.load(f, map_location=device),
        path, check, atol, 'The TorchScript module',
        _report(model, img_size, params_before, reparameterize, dynamic_batch=True))
    return {'module': module, **report}
