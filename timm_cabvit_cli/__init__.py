"""`timm-cabvit`: the CabViT models at a glance, and the tools around them.

With no command: each model's parameters, fvcore FLOPs and measured inference speed beside the paper's figures.
Commands: `flops` (parameters and FLOPs by component), `ablation` (the paper's Table 4 ladder), `attention`
(attention maps, the paper's Fig. 6), `recipe` (a training recipe for timm's train.py), `export` and `push`
(weights in the Hub layout timm reads, and their upload), `export-onnx` (ONNX, checked with ONNX Runtime).

This module is the whole command line: the parser, one function per command (`set_defaults(func=...)`, its
docstring the command's --help description) and the exit-code policy in `main`. It is a package of its own, beside
`timm_cabvit`, because importing `timm_cabvit` imports timm and torch to register the models (seconds on a small
machine): the parser needs only the standard library, so `--help` and usage errors answer at once, and each command
imports what it uses when it runs.

Exit codes: 0 success; 2 a command line that cannot work as written (argparse's errors, an unknown model or block,
an option value out of range, an output path that cannot be written, a Hub repo id that is none); 1 a failure while
running (a checkpoint or image that cannot be read, an export that fails its check, a failed upload, memory run out,
a torchvision that does not match torch). Either way one message on stderr, `timm-cabvit COMMAND: ...`, and no
traceback for a user's mistake. Unknown model names are refused from the package's metadata (its `timm.models`
entry points), before torch or timm is imported.
"""
import argparse
import difflib
import importlib.metadata
import importlib.util
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ['CommandError', 'UsageError', 'build_parser', 'main', 'recipe_path']

PROG = 'timm-cabvit'
DIST = 'timm-cabvit'  # the distribution: its version and its `timm.models` entry points (the model names)
WARMUP = 2  # untimed passes per model before the timed ones
ITERS = 5  # timed passes per model: the table shows their median and range


class CommandError(Exception):
    """A failure to report in one line; `main` returns its exit code."""

    exit_code = 1


class UsageError(CommandError):
    """A command line that cannot work as written."""

    exit_code = 2


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, without line breaks at hyphens: `pip install "timm-cabvit[onnx]"` stays whole."""

    def _split_lines(self, text: str, width: int) -> List[str]:
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(' '.join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse, its errors in the one-line form of all others (exit code 2, as argparse's own)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault('formatter_class', _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f'{self.prog}: {message} (see {self.prog} --help)\n')


def _dist_version(name: str) -> Optional[str]:
    """The installed version of a distribution, from its metadata (nothing imported); None if not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class _Version(argparse.Action):
    """`--version`: the package's version and those of what it runs on, from metadata alone (no torch import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: Optional[str] = None):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        versions = ', '.join(f'{name} {_dist_version(name) or "not installed"}'
                             for name in ('torch', 'torchvision', 'timm'))
        print(f"{PROG} {_dist_version(DIST) or '(not installed: pip install .)'} ({versions}, "
              f"Python {'.'.join(map(str, sys.version_info[:3]))})")
        parser.exit(0)


# Option values

def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            wanted = 'a positive integer' if lowest == 1 else f'an integer of at least {lowest}'
            raise argparse.ArgumentTypeError(f"expected {wanted}, got '{text}'")
        return value
    return parse


def _img_size(text: str) -> Tuple[int, int]:
    parts = text.lower().split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 256x192, got '{text}'")
    return int(parts[0]), int(parts[-1])


def _img_size_option(default: Optional[Tuple[int, int]], help: str) -> argparse.ArgumentParser:
    """`--img-size HxW`, for the commands that take it."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('--img-size', type=_img_size, default=default, metavar='HxW', help=help)
    return parent


def _flag_option(*args: str, **kwargs: Any) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*args, **kwargs)
    return parent


# Checks before any work

def _close_matches(word: str, choices: Sequence[str]) -> List[str]:
    """The closest of `choices` to `word` (case aside; difflib's, up to three): those as close as the closest."""
    word = word.lower()
    scores = {m: difflib.SequenceMatcher(None, word, m).ratio()
              for m in difflib.get_close_matches(word, choices, n=3, cutoff=0.6)}
    return sorted(m for m, score in scores.items() if score == max(scores.values()))


def _did_you_mean(word: str, choices: Sequence[str], match: Optional[str] = None) -> str:
    """`word`, and ' (did you mean X or Y?)' where `choices` hold close matches of it (or of `match`)."""
    matches = _close_matches(word if match is None else match, choices)
    if not matches:
        return word
    alternatives = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f'{word} (did you mean {alternatives}?)'


def _cabvit_names() -> List[str]:
    """The CabViT model names, from the installed package's `timm.models` entry points: neither torch nor timm is
    imported, so an unknown name is refused at once. Empty where the package is not installed as a distribution
    (then `_models` checks against timm's registry)."""
    try:
        entry_points = importlib.metadata.distribution(DIST).entry_points
    except importlib.metadata.PackageNotFoundError:
        return []
    return sorted(ep.name for ep in entry_points if ep.group == 'timm.models')


def _check_names(names: Sequence[str]) -> None:
    """Refuse names (optionally with a pretrained tag, 'cabvit_h_l2.in1k') that are no CabViT model, naming the
    close matches, from the package metadata alone: before anything heavy is imported or built."""
    known = _cabvit_names()
    if not known:
        return
    unknown = [n for n in names if n.split('.', 1)[0] not in known]  # timm's split_model_name_tag
    if unknown:
        named = ', '.join(_did_you_mean(n, known, n.split('.', 1)[0]) for n in unknown)
        raise UsageError(f"unknown model(s) {named}; choose from {', '.join(known)}")


# torchvision's releases pair with torch's: torchvision 0.15 with torch 2.0, 0.16 with 2.1, ... 0.29 with 2.14 (the
# compatibility table of torchvision's README), so for torch 2.x the matching torchvision is 0.(x + 15).
TORCHVISION_MINOR_OFFSET = 15
TORCH_INDEX = 'https://download.pytorch.org/whl'


def _local_label(version: str) -> str:
    """The local version label of a wheel: 'cpu' of '2.14.1+cpu', '' of PyPI's '2.14.1'."""
    return version.partition('+')[2]


def _torchvision_mismatch() -> Optional[str]:
    """Where the installed torchvision does not match the installed torch, one line saying so and the pip command
    that installs the matching one; None where they match (or torch is missing: then it is not torchvision).

    Both versions are read from the distributions' metadata: torch.__version__ of PyPI's CUDA wheel carries its
    CUDA label ('2.14.1+cu130') where its metadata, like torchvision's, has none ('2.14.1'); the index's wheels
    carry theirs in both ('2.14.1+cpu', '0.29.1+cpu'). So the labels compare like with like: a CPU torch with
    PyPI's torchvision (built against the CUDA torch) is the mismatch that breaks `import timm` with "operator
    torchvision::nms does not exist"."""
    torch_version = _dist_version('torch')
    if torch_version is None:
        return None
    vision_version = _dist_version('torchvision')
    match = re.match(r'(\d+)\.(\d+)', torch_version)
    wanted = 'torchvision'
    if match and match.group(1) == '2':
        wanted = f'torchvision==0.{int(match.group(2)) + TORCHVISION_MINOR_OFFSET}.*'
    label = _local_label(torch_version)
    if vision_version is not None:
        release = re.match(r'(\d+\.\d+)', vision_version)
        same_release = wanted == 'torchvision' or (release and wanted == f'torchvision=={release.group(1)}.*')
        if same_release and _local_label(vision_version) == label:
            return None
    # the matching build: from PyTorch's index of torch's own label (cpu, cu126, rocm6.4, xpu), else from PyPI
    index = f' --index-url {TORCH_INDEX}/{label}' if re.fullmatch(r'cpu|cu\d+|rocm[\d.]+|xpu', label) else ''
    fix = f'pip install --force-reinstall --no-deps "{wanted}"{index}'
    build = f' ({label} build)' if label else ''
    if vision_version is None:
        return f'timm needs torchvision, which is not installed; install the one for torch {torch_version}: {fix}'
    return (f'torchvision {vision_version} does not match torch {torch_version}{build}, so timm cannot be imported; '
            f'install the torchvision built for it: {fix}')


def _import_timm() -> Any:
    """timm, with the CabViT models registered; a torchvision that does not match torch (the usual reason for
    `import timm` to fail on a fresh machine) is reported in one line with the command that fixes it."""
    try:
        import timm

        import timm_cabvit  # noqa: F401  (registers the models)
    except (ImportError, RuntimeError, OSError):
        problem = _torchvision_mismatch()
        if problem is None:
            raise
        raise CommandError(problem) from None
    return timm


def _models(names: Optional[Sequence[str]], img_size: Optional[Tuple[int, int]] = None) -> List[str]:
    """The names (optionally with a pretrained tag; all CabViT models if None), after checking each is a CabViT
    model that can be built for `img_size`: on the meta device, which takes neither memory nor time, so a bad size
    fails at once. Unknown names are refused before timm is imported."""
    if names is not None:
        _check_names(names)
    timm = _import_timm()
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    known = timm.list_models('cabvit*')
    if names is None:
        names = known
    unknown = [n for n in names if split_model_name_tag(n)[0] not in known]
    if unknown:
        named = ', '.join(_did_you_mean(n, known, split_model_name_tag(n)[0]) for n in unknown)
        raise UsageError(f"unknown model(s) {named}; choose from {', '.join(known)}")
    for name in names:
        arch, tag = split_model_name_tag(name)
        if tag and name not in get_arch_pretrained_cfgs(arch):
            raise UsageError(f"unknown pretrained tag '{tag}' of {arch}; its tags are "
                             f"{', '.join(get_arch_pretrained_cfgs(arch))}")
        if img_size is not None:
            try:
                timm.create_model(arch, img_size=img_size, device='meta')
            except ValueError as e:
                raise UsageError(f'--img-size {img_size[0]}x{img_size[1]}: {e}') from e
    return list(names)


def _timing_device(text: Optional[str]) -> 'torch.device':  # noqa: F821
    """The device to measure speed on: one that runs kernels and exists here."""
    import torch

    if text is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a device; measure on cpu, cuda, cuda:N or mps") from None
    if device.type == 'meta':
        raise UsageError('--device meta: meta tensors hold no data and run no kernels, so there is no speed to '
                         'measure; use cpu, cuda or mps')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {text}: no CUDA device is available here (torch {torch.__version__}); '
                             f'use cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f'--device {text}: there are {torch.cuda.device_count()} CUDA devices, cuda:0 '
                             f'to cuda:{torch.cuda.device_count() - 1}')
    elif device.type == 'mps':
        if not torch.backends.mps.is_available():
            raise UsageError(f'--device {text}: MPS is not available here; use cpu')
    elif device.type != 'cpu':
        raise UsageError(f'--device {text}: speeds are measured on cpu, cuda and mps devices only')
    return device


def _writable_folder(folder: Path, option: str) -> None:
    """Fail unless files can be written in `folder` or, where it does not exist yet, in its nearest ancestor (the
    writer creates the missing folders)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f'{option}: {existing} is a file, not a folder')
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(
            f'{option}: files cannot be created in {existing} ({e.strerror or e}); choose another folder') from None


def _output_file(text: str, option: str, example: str) -> Path:
    """The file an option names, after checking it can be written (missing folders are created on writing)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise UsageError(f'{option} {text} is a folder; give a file to write, e.g. {path / example}')
    _writable_folder(path.parent, f'{option} {text}')
    return path


def _output_folder(text: str, option: str) -> Path:
    """The folder an option names, after checking it can be created or written in."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f'{option} {text} is a file; give a folder to write (created if needed)')
    _writable_folder(path, f'{option} {text}')
    return path


def _progress(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def _wrote(path: Any, what: str) -> None:
    """Say where a file a command wrote beside its output went (stderr, so that stdout stays the output)."""
    print(f'wrote {path} ({what})', file=sys.stderr)


# Commands

def run_table(args: argparse.Namespace) -> None:
    """The models at a glance: parameters, FLOPs, the paper's figures and measured speed."""
    names = _models(args.models, args.img_size)
    device = _timing_device(args.device)
    _require_extra('fvcore', "Counting the table's FLOPs")
    import torch

    from timm_cabvit.tools.reports import Timing, models_table

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    timing = Timing(args.batch_size, args.img_size, device, args.warmup, args.iters)
    with _progress(len(names) * (args.warmup + args.iters), 'measuring', 'pass') as progress:
        rows = models_table(names, timing, progress)
    print('\n'.join(rows))


def run_flops(args: argparse.Namespace) -> None:
    """Parameters and fvcore FLOPs of each component (stem, ConvNeXt blocks, downsampling, attention with its
    digest keys, TME, FFN, head) - the paper's Fig. 5 decomposition for whole models - beside the same model with
    cross-block attention switched off.
    """
    names = _models(args.models, args.img_size)
    plot = _output_file(args.plot, '--plot', 'flops.png') if args.plot else None
    _require_extra('fvcore', 'Counting FLOPs')
    if plot:
        _require_extra('matplotlib.figure', 'Plotting the FLOPs (--plot)')
    import json

    from timm_cabvit.tools.reports import flops_report, flops_table, save_flops_plot

    with _progress(2 * len(names), 'counting FLOPs', 'model') as progress:
        reports = [flops_report(name, args.img_size, progress) for name in names]
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print('\n\n'.join('\n'.join(flops_table(report)) for report in reports))
    if plot:
        save_flops_plot(reports, plot)
        _wrote(plot, 'GFLOPs by component')


def run_ablation(args: argparse.Namespace) -> None:
    """Parameters and FLOPs of a model as the ideas of the paper are switched on one at a time (model arguments
    cross_block and digest_scale), beside the increments of the paper's Table 4 and its "about 13 % extra compute".
    """
    (name,) = _models([args.model], args.img_size)
    _require_extra('fvcore', 'Counting FLOPs')
    import json

    from timm_cabvit.tools.reports import ABLATION_STEPS, ablation_ladder, ablation_table

    with _progress(len(ABLATION_STEPS), 'counting FLOPs', 'step') as progress:
        ladder = ablation_ladder(name, args.img_size, progress)
    print(json.dumps(ladder, indent=2) if args.json else '\n'.join(ablation_table(name, ladder)))


def run_attention(args: argparse.Namespace) -> None:
    """The softmax attention of chosen CabViT blocks for one image (queries x [tokens; digests]), the digest-token
    columns in a red box, as in the paper's Fig. 6. Random weights (no --checkpoint) give near-uniform maps.
    """
    (name,) = _models([args.model], args.img_size)
    out = _output_file(args.out, '--out', 'attention.png')
    if args.blocks:
        _check_blocks(name, args.blocks, args.img_size)
    if not Path(args.image).is_file():
        raise CommandError(f"image '{args.image}' is not a file")
    _require_extra('matplotlib.figure', 'Drawing attention maps')
    if args.checkpoint is None:
        print(f'{PROG} attention: note: no --checkpoint, so the weights are random and the maps are near uniform; '
              f'give trained weights (--checkpoint FILE) for maps that mean something', file=sys.stderr)
    from timm_cabvit.tools.attention_maps import run_attention_command

    print(run_attention_command(args.image, name, checkpoint=args.checkpoint, blocks=args.blocks, out=out,
                                img_size=args.img_size))


def _require_extra(module: str, purpose: str) -> None:
    """Fail before any work where a tool's dependency is missing, naming the extra that installs it."""
    from timm_cabvit import MissingExtraError, import_extra

    try:
        import_extra(module, 'tools', purpose)
    except MissingExtraError as e:
        raise CommandError(str(e)) from None


def _check_blocks(name: str, blocks: Sequence[str], img_size: Optional[Tuple[int, int]]) -> None:
    """Refuse block names the model does not have, from the model built on the meta device (no memory, no time,
    no checkpoint read): the blocks are the architecture's, whatever the weights."""
    import timm

    from timm_cabvit.tools.attention_maps import cabvit_blocks

    kwargs = {} if img_size is None else {'img_size': img_size}
    available = list(cabvit_blocks(timm.create_model(name.split('.', 1)[0], num_classes=0, device='meta', **kwargs)))
    unknown = [b for b in blocks if b not in available]
    if unknown:
        raise UsageError(f"--blocks: unknown block(s) {', '.join(_did_you_mean(b, available) for b in unknown)}; "
                         f"{name} has {', '.join(available)}")


def recipe_path(model_name: str) -> Path:
    """The packaged train.py recipe (YAML) of a model; found without importing the package (and so torch)."""
    spec = importlib.util.find_spec('timm_cabvit')
    recipes = Path(next(iter(spec.submodule_search_locations))) / 'recipes'
    path = recipes / f'{model_name}.yaml'
    if not path.is_file():
        known = sorted(p.stem for p in recipes.glob('*.yaml'))
        raise ValueError(f"no training recipe for '{model_name}'; recipes exist for {', '.join(known)}")
    return path


def run_recipe(args: argparse.Namespace) -> None:
    """Print the paper's ImageNet training recipe of a model as a YAML config for timm's train.py (train.py -c
    FILE), or with --path where the file is.
    """
    _check_names([args.model])
    try:
        path = recipe_path(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(path if args.path else path.read_text(encoding='utf-8'), end='\n' if args.path else '')


def run_export(args: argparse.Namespace) -> None:
    """Write the Hub layout timm reads (config.json, model.safetensors, a README.md model card) from a checkpoint:
    our own state dict, a timm train.py checkpoint or the authors' reference layout. The weights are loaded
    strictly; nothing is exported partially.
    """
    (name,) = _models([args.model], args.img_size)
    if args.repo_id is not None:
        _check_repo_id(args.repo_id, 'the folder to write is --out')
    from timm_cabvit.tools import hub

    try:
        metrics = hub.parse_metrics(args.metric)
    except ValueError as e:
        raise UsageError(f'--metric: {e}') from None
    out = _output_folder(args.out, '--out')
    folder = hub.export_checkpoint(args.checkpoint, name, out, metrics=metrics, img_size=args.img_size,
                                   repo_id=args.repo_id)
    print(folder)


def run_push(args: argparse.Namespace) -> None:
    """Upload a folder written by `timm-cabvit export` to a Hub model repo, creating the repo if needed. Log in
    first with `hf auth login` or set HF_TOKEN.
    """
    _check_repo_id(args.repo_id, 'the folder to upload is DIR')
    _import_timm()
    from timm_cabvit.tools import hub

    print(hub.push(args.dir, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                   create_pr=args.create_pr, commit_message=args.commit_message))


def _check_repo_id(repo_id: str, folder: str) -> None:
    """Refuse a --repo-id that is no Hub repo id (a local path, say) before anything is read or sent; `folder` says
    where the command takes its folder instead."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        local = f' but a path here ({folder})' if Path(repo_id).expanduser().exists() else ''
        raise UsageError(f"--repo-id {repo_id}: not a Hub model repo id{local}; give ORG/NAME or NAME, of letters, "
                         f"digits, '-', '_' and '.', at most 96 characters, e.g. me/cabvit_h_l1") from None


def run_export_onnx(args: argparse.Namespace) -> None:
    """Export a model to ONNX (BatchNorm folded, dynamic batch) and check it: ONNX Runtime against PyTorch on
    random images of batch 1 and 3 (max abs difference < 1e-4, printed also relative to the largest output).
    Without --checkpoint the weights are random and their BatchNorm statistics are calibrated on random images
    first, so that the outputs compared do not vanish. The image size is fixed: the attention bias tables are sized
    for it. Needs pip install "timm-cabvit[onnx]".
    """
    (name,) = _models([args.model], args.img_size)
    import torch

    from timm_cabvit.tools import deploy

    lowest, highest = deploy.onnx_opset_range()
    if not lowest <= args.opset <= highest:
        raise UsageError(f'--opset {args.opset}: opset must be {lowest} or newer, and at most {highest}, the newest '
                         f'the installed torch {torch.__version__} exports')
    out = _output_file(args.out, 'OUT', f'{name}.onnx')
    try:
        deploy.require_onnx()
    except ImportError as e:
        raise CommandError(str(e)) from None
    if args.checkpoint is None:
        weights = (f'random weights, BatchNorm statistics calibrated on {deploy.CALIBRATION_BATCHES} batches of 8 '
                   f'random images (at their initial statistics the outputs nearly vanish and the check would compare '
                   f'zeros)')
    else:
        weights = f'weights of {args.checkpoint}'
    report = deploy.export_onnx(name, out, img_size=args.img_size, opset=args.opset,
                                reparameterize=not args.no_reparam, checkpoint=args.checkpoint)
    h, w = report['img_size']
    print(f"{report['path']}: opset {report['opset']}, input (batch, 3, {h}, {w}), {report['params']:,} parameters "
          f"({report['params_before']:,} before folding BatchNorm)")
    print(f"checked: ONNX Runtime against PyTorch on random images at batch "
          f"{' and '.join(map(str, report['batch_sizes']))}, {weights}: max abs difference "
          f"{report['max_abs_diff']:.1e}, {report['max_rel_diff']:.1e} of the largest output "
          f"({report['max_abs_output']:.3g})")


# The parser

def _command(commands: Any, name: str, func: Any, help: str, parents: Sequence[argparse.ArgumentParser] = ()
             ) -> argparse.ArgumentParser:
    """The sub-parser of command `name`, run by `func(args)`; its --help description is `func`'s docstring."""
    command = commands.add_parser(name, parents=list(parents), help=help, description=func.__doc__)
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    """The parser: one sub-parser per command, each with `func` (and `command`) as defaults."""
    measured_size = _img_size_option(
        (224, 224), 'input size the models are built for, e.g. 224 or 256x192 (default: 224)')
    built_size = _img_size_option(
        None, "input size the model is built for, e.g. 224 or 256x192 (default: the checkpoint's, else 224)")
    checkpoint = _flag_option(
        '--checkpoint', metavar='FILE',
        help='weights: our state dict, a timm train.py checkpoint or the reference layout (default: random)')
    as_json = _flag_option('--json', action='store_true', help='print JSON instead of tables')

    parser = _Parser(
        prog=PROG, parents=[measured_size],
        description="CabViT models for timm. With no command: a table of the models with their parameters, "
                    "fvcore FLOPs (one multiply-add = one FLOP, as the paper counts), the paper's parameters, "
                    "FLOPs and ImageNet top-1 beside ours, and measured inference images/s on this machine "
                    "(median and range of the timed passes; a note when other processes kept cores busy).",
        epilog='Exit codes: 0 success, 2 a command line that cannot work as written, 1 a failure while running.')
    parser.add_argument('--version', action=_Version,
                        help="print timm-cabvit's version and those of torch, torchvision and timm, and exit")
    parser.add_argument('--models', nargs='+', metavar='NAME', help='models to show (default: all four)')
    parser.add_argument('--batch-size', type=_int_at_least(1), default=8,
                        help='images per forward pass when measuring speed (default: %(default)s)')
    parser.add_argument('--device', help='device to measure on: cpu, cuda, cuda:N or mps '
                                         '(default: cuda if available, else cpu)')
    parser.add_argument('--warmup', type=_int_at_least(0), default=WARMUP,
                        help='untimed passes per model (default: %(default)s)')
    parser.add_argument('--iters', type=_int_at_least(1), default=ITERS,
                        help='timed passes per model; their median and range are shown (default: %(default)s)')
    parser.add_argument('--threads', type=_int_at_least(1),
                        help="torch's CPU threads when measuring (default: torch's, one per core). When other "
                             "processes keep cores busy the figures are measured again on 1 thread, and a note says "
                             "when they are not speeds at all")
    parser.set_defaults(func=run_table, command=None)
    commands = parser.add_subparsers(dest='command', metavar='COMMAND')

    flops = _command(
        commands, 'flops', run_flops, parents=[measured_size, as_json],
        help='parameters and FLOPs by component, and the cost of cross-block attention')
    flops.add_argument('models', nargs='*', default=['cabvit_h_l1', 'cabvit_h_l2'], metavar='MODEL',
                       help='models (default: cabvit_h_l1 cabvit_h_l2)')
    flops.add_argument('--plot', metavar='PNG', help='also write a bar chart of the decomposition to this file')

    ablation = _command(
        commands, 'ablation', run_ablation, parents=[measured_size, as_json],
        help="the paper's ablation ladder (Table 4): parameters and FLOPs as each idea is added")
    ablation.add_argument('model', nargs='?', default='cabvit_h_l1', help='model (default: %(default)s)')

    attention = _command(
        commands, 'attention', run_attention, parents=[built_size, checkpoint],
        help='draw the attention maps of chosen blocks, digest-token columns marked, as a PNG')
    attention.add_argument('image', help='image file (JPEG, PNG, ...)')
    attention.add_argument('--model', required=True, metavar='NAME', help='CabViT model, e.g. cabvit_h_l1')
    attention.add_argument('--blocks', nargs='+', metavar='NAME',
                           help='blocks, e.g. stages.2.blocks.1 (default: blocks 2, 4, 6 of stage 3 and 2 of '
                                'stage 4; CabViT-P: blocks.1 blocks.3 blocks.5 blocks.11)')
    attention.add_argument('--out', default='attention.png', metavar='PNG',
                           help='file to write, its folder created if needed (default: %(default)s)')

    recipe = _command(
        commands, 'recipe', run_recipe, help="print a model's ImageNet training recipe for timm's train.py")
    recipe.add_argument('model', help='model name, e.g. cabvit_h_l2')
    recipe.add_argument('--path', action='store_true', help='print the path of the YAML file instead of its text')

    export = _command(
        commands, 'export', run_export, parents=[_img_size_option(
            None, 'training input size, when not a square one readable from the checkpoint')],
        help='write a checkpoint as config.json, model.safetensors and README.md for the Hub')
    export.add_argument('checkpoint', help='checkpoint file (.pth, .pth.tar, .bin or .safetensors)')
    export.add_argument('--model', required=True, metavar='NAME',
                        help='CabViT model, optionally with its tag, e.g. cabvit_h_l2.in1k')
    export.add_argument('--out', required=True, metavar='DIR', help='folder to write (created if needed)')
    export.add_argument('--metric', action='append', default=[], metavar='NAME=VALUE',
                        help='evaluation result for the model card, e.g. top1=83.0 (repeatable)')
    export.add_argument('--repo-id', metavar='ORG/NAME', help="the Hub repo it is for (default: the tag's)")

    onnx = _command(
        commands, 'export-onnx', run_export_onnx, parents=[built_size, checkpoint],
        help='export a model to ONNX and check it against PyTorch with ONNX Runtime')
    onnx.add_argument('model', metavar='NAME', help='model name, e.g. cabvit_h_l2')
    onnx.add_argument('out', metavar='OUT.onnx', help='ONNX file to write, its folder created if needed')
    onnx.add_argument('--opset', type=int, default=20,
                      help='ONNX opset, from 17 to the newest the installed torch exports (default: %(default)s)')
    onnx.add_argument('--no-reparam', action='store_true',
                      help='export without folding the BatchNorms into the convolutions')

    push = _command(commands, 'push', run_push, help='upload an exported folder to a Hugging Face Hub model repo')
    push.add_argument('dir', help='folder written by timm-cabvit export')
    push.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='model repo to upload to')
    push.add_argument('--token', help='Hub token with write access (default: the logged-in one)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', help='branch to commit to')
    push.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    push.add_argument('--commit-message', default='Add CabViT weights', help='commit message')
    return parser


# The exit-code policy

def _user_errors() -> Tuple[type, ...]:
    """What the package raises for a user's mistake or a failed read, write or upload: bad values (ValueError),
    files and connections (OSError), checkpoints and Hub repos (CheckpointError), exports that fail their check.
    The package's own classes count once their module is loaded: before that, none of them can have been raised."""
    errors = [ValueError, OSError]
    for module, name in (('timm_cabvit.weights', 'CheckpointError'), ('timm_cabvit.tools.deploy', 'ExportCheckError')):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` is memory run out: Python's MemoryError, torch's OutOfMemoryError (CUDA, MPS, XPU), or
    the RuntimeError of its CPU allocator ("DefaultCPUAllocator: can't allocate memory" / "not enough memory")."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get('torch')
    if torch is not None and isinstance(error, getattr(torch, 'OutOfMemoryError', ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ('out of memory', "can't allocate memory", 'not enough memory'))


def _memory_message(error: BaseException, args: argparse.Namespace) -> str:
    """One line for memory run out: how much was asked for where torch says, and the settings to lower."""
    asked = ''
    match = re.search(r'tried to allocate (\d+) bytes', str(error), re.IGNORECASE)
    if match:
        size, unit = float(match.group(1)), 'bytes'
        for bigger in ('kB', 'MB', 'GB', 'TB', 'PB', 'EB'):
            if size < 1000:
                break
            size, unit = size / 1000, bigger
        asked = f' (tried to allocate {size:.3g} {unit})'
    else:  # CUDA's "Tried to allocate 20.00 MiB"
        match = re.search(r'tried to allocate ([\d.]+ ?[KMGTP]i?B)', str(error), re.IGNORECASE)
        asked = f' (tried to allocate {match.group(1)})' if match else ''
    settings = []
    if args.command is None:  # the table; the namespace of a command holds the table's defaults too
        settings.append(f'--batch-size (now {args.batch_size})')
    if args.command not in ('recipe', 'push'):
        size = "the checkpoint's, else 224" if args.img_size is None else f'{args.img_size[0]}x{args.img_size[1]}'
        settings.append(f'--img-size (now {size})')
    lower = f": lower {' or '.join(settings)}" if settings else ''
    return f'out of memory{asked}{lower}'


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; the exit code (see the module doc). argparse's errors exit here (SystemExit 2)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        return 0
    except CommandError as e:
        code, message = e.exit_code, str(e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if _out_of_memory(e):
            code, message = 1, _memory_message(e, args)
        elif isinstance(e, _user_errors()):
            code, message = 1, str(e)
        else:
            raise
    print(f"{PROG}{'' if args.command is None else ' ' + args.command}: {message}", file=sys.stderr)
    return code
