""" Publishing CabViT weights on the Hugging Face Hub, and loading them with errors that say what to do

`export_checkpoint` turns any checkpoint `checkpoint_filter_fn` accepts (ours, a timm train.py checkpoint, the
authors' reference layout) into the folder timm reads from the Hub: `config.json` and `model.safetensors` written
by timm's own `save_for_hf`, and a `README.md` model card with the given metrics. `push` uploads such a folder.
`create_model` is `timm.create_model` with errors that name the file or Hub repo at fault and the way out.

No ImageNet weights are published yet: the repos the pretrained cfgs name (`timm-cabvit/cabvit_h_l1.in1k`, ...)
do not exist until someone trains the models and pushes them.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg, save_for_hf, split_model_name_tag
from timm.models._hub import generate_readme

from ..cabvit import convert_reference, is_reference_layout
from ..weights import (
    CheckpointError,
    check_checkpoint_file,
    checkpoint_metadata,
    read_checkpoint,
    saved_img_size,
    unwrap_checkpoint,
)
from .flops import num_params

__all__ = ['CheckpointError', 'create_model', 'export_checkpoint', 'parse_metrics', 'push']

PathLike = Union[str, os.PathLike]

HUB_CONFIG = 'config.json'
HUB_WEIGHTS = 'model.safetensors'

_CITATION = """@article{zhang2022cabvit,
  title={CabViT: Cross Attention among Blocks for Vision Transformer},
  author={Zhang, Haokui and Hu, Wenze and Wang, Xiaoyu},
  journal={arXiv preprint arXiv:2211.07198},
  year={2022}
}"""

# the dataset a pretrained tag names, and its class count
_DATASETS = {'in1k': ('ImageNet-1k', 1000), 'in22k': ('ImageNet-22k', 21841), 'in22k_ft_in1k': ('ImageNet-1k', 1000)}


def _local_file_hint(arch: str) -> str:
    return (
        f"To load a checkpoint file you have: timm.create_model('{arch}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.safetensors')) "
        f"(.pth, .pth.tar and .bin files of our, timm train.py or the reference layout work too).")


def _resolve_name(model_name: str) -> Tuple[str, str]:
    """Split 'arch.tag' and check both exist, so that a typo is not a silent fallback or a bare KeyError."""
    arch, tag = split_model_name_tag(model_name)
    models = timm.list_models('cabvit_*')
    if arch not in models:
        raise CheckpointError(f"Unknown model '{arch}'; the CabViT models are {', '.join(models)}.")
    names = list(get_arch_pretrained_cfgs(arch))
    if tag and f'{arch}.{tag}' not in names:
        raise CheckpointError(
            f"Unknown pretrained tag '{tag}' for {arch}; its tags are {', '.join(names)}. "
            + _local_file_hint(arch))
    return arch, tag


def _weights_repo(model_name: str, overlay: Optional[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
    """The architecture and the Hub repo (with @revision) that `timm.create_model` takes the weights from."""
    source, sep, model_id = model_name.partition(':')
    if sep and source in ('hf-hub', 'hf_hub'):
        # the architecture is in the repo's config.json; a repo named as ours, 'ORG/ARCH.TAG', tells it too
        arch = split_model_name_tag(model_id.split('/')[-1].split('@')[0])[0]
        return arch if arch in timm.list_models('cabvit_*') else 'ARCHITECTURE', model_id
    if sep:
        return model_name, None
    arch, _ = _resolve_name(model_name)
    cfg = dict(get_pretrained_cfg(model_name).to_dict(), **(overlay or {}))
    if cfg.get('state_dict') is not None or cfg.get('file'):
        return arch, None
    return arch, cfg.get('hf_hub_id')


def _explain_hub_error(error: Exception, arch: str, repo: str) -> Optional[CheckpointError]:
    """A CheckpointError saying what to do about a failed load from a Hub repo, None if the repo is not at fault."""
    repo_id, _, revision = repo.partition('@')
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointError(
            f"Hugging Face Hub repo '{repo_id}' does not exist or is not accessible (HF_ENDPOINT "
            f"{constants.ENDPOINT}). ImageNet weights of the CabViT models are not published yet; a private repo "
            f"needs a token (hf auth login or HF_TOKEN). " + _local_file_hint(arch))
    if isinstance(error, RevisionNotFoundError):
        return CheckpointError(f"Hugging Face Hub repo '{repo_id}' has no revision '{revision}'.")
    if isinstance(error, RemoteEntryNotFoundError):
        return CheckpointError(
            f"Hugging Face Hub repo '{repo_id}' lacks a file timm needs ({error.response.url}); a repo written by "
            f"`timm-cabvit export` and `timm-cabvit push` has {HUB_CONFIG} and {HUB_WEIGHTS}.")
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        offline = ' HF_HUB_OFFLINE is set.' if constants.HF_HUB_OFFLINE else ''
        return CheckpointError(
            f"Could not download Hugging Face Hub repo '{repo_id}' from {constants.ENDPOINT}, and it is not in the "
            f"cache ({cache}).{offline} Load it once with network access (later loads work offline), or load a "
            f"local copy. " + _local_file_hint(arch))
    for filename in (HUB_WEIGHTS, 'pytorch_model.bin'):
        cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(cached, str):
            try:
                check_checkpoint_file(
                    cached,
                    what=f"the cached download of Hugging Face Hub repo '{repo_id}'",
                    remedy=f'Delete {cache} to download it again; if that fails too, the file in the repo is bad: '
                           f'export and push it again.')
            except CheckpointError as e:
                return e
    return None


def _saved_input(
        checkpoint: Dict[str, Any],
        model_name: str,
        metadata: Dict[str, Any],
        img_size: Optional[Tuple[int, int]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The checkpoint's weights in our layout, and the num_classes, in_chans, img_size and global_pool they were
    trained with.

    Read from the classifier, the first conv, and what the checkpoint records (`metadata`, from `read_checkpoint`
    or `checkpoint_metadata`) or its tables tell (`weights.saved_img_size`); img_size is left out where neither
    says. `img_size`, the size the user says it was trained at, must agree with both.
    """
    state_dict = unwrap_checkpoint(checkpoint)
    if is_reference_layout(state_dict):
        state_dict = convert_reference(state_dict)
    model = timm.create_model(model_name, device='meta')
    classifier = state_dict.get(f"{model.pretrained_cfg['classifier']}.weight")
    first_conv = state_dict.get(f"{model.pretrained_cfg['first_conv']}.weight")
    saved = dict(num_classes=classifier.shape[0] if isinstance(classifier, torch.Tensor) else 0)
    if isinstance(first_conv, torch.Tensor) and first_conv.ndim == 4:
        saved['in_chans'] = first_conv.shape[1]
    recorded = metadata.get('img_size')
    if img_size is not None and recorded is not None and tuple(img_size) != tuple(recorded):
        raise CheckpointError(
            f"The checkpoint records the input size {recorded[0]}x{recorded[1]}, not the given "
            f"{img_size[0]}x{img_size[1]}: leave the size out, or build the model at another size after loading it "
            f"(timm_cabvit.tools.hub.create_model(..., checkpoint=FILE, img_size=...) resamples its tables).")
    trained_at = saved_img_size(state_dict, model, img_size or recorded)
    if img_size is not None and trained_at != tuple(img_size):
        fits = f'they fit {trained_at[0]}x{trained_at[1]}' if trained_at else 'they fit no size this model has'
        raise CheckpointError(
            f"The checkpoint's bias tables were not trained at the given input size {img_size[0]}x{img_size[1]} "
            f"({fits}): give the size it was trained at, or leave it out.")
    if trained_at is not None:
        saved['img_size'] = trained_at
    if 'global_pool' in metadata:
        saved['global_pool'] = metadata['global_pool']
    return state_dict, saved


def _input_overlay(model_name: str, state_dict: Dict[str, torch.Tensor], saved: Dict[str, Any]) -> Dict[str, Any]:
    """Pretrained cfg entries that make timm load a state dict as trained: its classes, channels and size."""
    input_size = get_pretrained_cfg(model_name).input_size
    return dict(
        state_dict=state_dict,
        num_classes=saved['num_classes'],
        input_size=(saved.get('in_chans', input_size[0]), *saved.get('img_size', input_size[-2:])),
    )


def create_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint: Optional[PathLike] = None,
        **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` for CabViT models, with errors that name the file or Hub repo at fault and the way out.

    With a checkpoint file, the model takes the class count, input channels and input size of the checkpoint unless
    given: its classifier is kept where the class count fits, and replaced with a warning where it does not.

    Args:
        model_name: A CabViT model, with or without pretrained tag ('cabvit_h_l1', 'cabvit_h_l1.in1k'), or
            'hf-hub:ORG/NAME' for weights exported by `export_checkpoint`.
        pretrained: Load the weights the pretrained cfg names (a Hub repo unless pretrained_cfg_overlay says else).
        checkpoint: A local checkpoint file of any layout `checkpoint_filter_fn` accepts; implies pretrained.
        **kwargs: Passed to `timm.create_model` (num_classes, in_chans, img_size, pretrained_cfg_overlay, ...).
    """
    if checkpoint is not None:
        arch, _ = _resolve_name(model_name)
        path = Path(checkpoint)
        contents, metadata = read_checkpoint(path)
        state_dict, saved = _saved_input(contents, arch, metadata)
        overlay = _input_overlay(model_name, state_dict, saved)
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, file=str(path), **overlay)
        for key, value in saved.items():
            kwargs.setdefault(key, value)
        pretrained = True
    arch, repo = _weights_repo(model_name, kwargs.get('pretrained_cfg_overlay'))
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (HfHubHTTPError, EntryNotFoundError, OSError, RuntimeError, safetensors.SafetensorError) as e:
        if repo is None:
            raise
        explained = _explain_hub_error(e, arch, repo)
        if explained is None:
            raise
        raise explained from e
    if isinstance(getattr(model, 'pretrained_cfg', None), dict):
        model.pretrained_cfg.pop('state_dict', None)  # the loaded weights, which the cfg would keep a second copy of
    return model


def parse_metrics(items: Iterable[str]) -> Dict[str, Union[float, str]]:
    """'top1=80.3' strings, as given on the command line, to a metrics dict (numbers as floats)."""
    metrics = {}
    for item in items:
        name, sep, value = item.partition('=')
        if not sep or not name.strip():
            raise ValueError(f"A metric is NAME=VALUE, e.g. top1=80.3; got '{item}'.")
        try:
            metrics[name.strip()] = float(value)
        except ValueError:
            metrics[name.strip()] = value.strip()
    return metrics


def export_checkpoint(
        checkpoint: Union[PathLike, Dict[str, Any]],
        model_name: str,
        out_dir: PathLike,
        metrics: Optional[Dict[str, Union[float, str]]] = None,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        repo_id: Optional[str] = None,
        model_card: Optional[Dict[str, Any]] = None,
        label_names: Optional[Sequence[str]] = None,
        dataset: Optional[str] = None,
) -> Path:
    """Write the Hub layout timm reads: config.json, model.safetensors and a README.md model card.

    The weights are loaded strictly through timm's `load_pretrained` and `checkpoint_filter_fn`, into a model with
    the class count, input channels and input size of the checkpoint itself, so the export holds what was trained.
    Hugging Face transformers loads the folder too (`AutoModelForImageClassification.from_pretrained(out_dir)`,
    `pipeline('image-classification', model=out_dir)`, through its TimmWrapper), with the input size and
    preprocessing of the export.

    Args:
        checkpoint: File or state dict of our layout, a timm train.py checkpoint or the reference layout.
        model_name: CabViT model, optionally with the pretrained tag whose metadata to use ('cabvit_h_l1.in1k').
        out_dir: Folder to write (created if needed).
        metrics: Evaluation results for the model card, e.g. {'top1': 80.3, 'top5': 95.0}.
        img_size: Input size the weights were trained at, where the checkpoint does not record it (a timm train.py
            checkpoint or an export does) and it is not a square one readable from the bias tables.
        repo_id: Hub repo the folder is meant for, used in the card's usage example (default: the cfg's hf_hub_id).
        model_card: Entries overriding those of the generated card (timm's `generate_readme` format).
        label_names: One name per class, in classifier order: the labels transformers' pipeline reports (and
            `label_names` of timm's pretrained cfg). Default: none, which transformers reads as the ImageNet-1k
            classes for 1000 classes and as LABEL_0, LABEL_1, ... otherwise.
        dataset: The dataset the weights were trained on, for the card, e.g. 'ImageNet-1k' (default: the one a
            pretrained tag given in `model_name` names, if the class count is that dataset's; else none claimed).

    Returns:
        The output folder.
    """
    arch, tag = _resolve_name(model_name)
    is_file = isinstance(checkpoint, (str, os.PathLike))
    if img_size is not None:
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    contents, metadata = read_checkpoint(checkpoint) if is_file else (checkpoint, checkpoint_metadata(checkpoint))
    state_dict, saved = _saved_input(contents, arch, metadata, img_size=img_size)
    if 'img_size' not in saved:
        raise CheckpointError(
            'Cannot tell the input size the checkpoint was trained at: it records none and its bias tables fit no '
            'square size. Pass it: img_size (--img-size HxW).')
    model_config = None
    if label_names is not None:
        if isinstance(label_names, str):
            raise CheckpointError('label_names is a list of class names, one per class, not one string.')
        label_names = [str(name) for name in label_names]
        if len(label_names) != saved['num_classes']:
            raise CheckpointError(
                f"{len(label_names)} label names for a checkpoint with {saved['num_classes']} classes: give one name "
                f"per class, in classifier order.")
        model_config = dict(label_names=label_names)
    overlay = _input_overlay(model_name, state_dict, saved)
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **saved).eval()

    out_dir = Path(out_dir)
    save_for_hf(model, out_dir, model_config=model_config, safe_serialization=True)
    _leave_num_classes_to_the_root(out_dir / HUB_CONFIG)
    # timm's weights again, as save_for_hf writes them, with the size in the file's own header too, so that the
    # weights copied alone still say what they were trained at
    height, width = model.img_size
    expected = model.state_dict()
    safetensors.torch.save_file(
        expected, out_dir / HUB_WEIGHTS, metadata={'format': 'pt', 'img_size': f'{height}x{width}'})
    written = safetensors.torch.load_file(out_dir / HUB_WEIGHTS)
    if written.keys() != expected.keys() or any(not torch.equal(written[k], v) for k, v in expected.items()):
        raise CheckpointError(f"'{out_dir / HUB_WEIGHTS}' does not hold the model's weights after writing it.")

    repo_id = repo_id or model.pretrained_cfg.get('hf_hub_id') or f'ORG/{model_name}'
    card = _model_card(model, arch, dataset or _tag_dataset(tag, saved['num_classes']), repo_id)
    card.update(model_card or {})
    citation = card.pop('citation', None)
    readme = generate_readme(card, repo_id.split('/')[-1]) + _metrics_section(metrics)
    if citation:
        readme += f'\n## Citation\n```bibtex\n{citation}\n```\n'
    (out_dir / 'README.md').write_text(readme, encoding='utf-8')
    return out_dir


def _leave_num_classes_to_the_root(config_path: Path) -> None:
    """Drop the class count from the config's model_args: the root's num_classes says it for timm and transformers.

    timm records it in both places; transformers' TimmWrapper passes model_args to `timm.create_model` beside a
    num_classes of its own (read from the root), which fails with "got multiple values for keyword argument
    'num_classes'". timm builds the model with the root's count when model_args lacks it.
    """
    config = json.loads(config_path.read_text(encoding='utf-8'))
    config.get('model_args', {}).pop('num_classes', None)
    config_path.write_text(json.dumps(config, indent=2), encoding='utf-8')


def _tag_dataset(tag: str, num_classes: int) -> Optional[str]:
    """The dataset a pretrained tag the user gave names ('in1k': ImageNet-1k), where the class count is its."""
    dataset, dataset_classes = _DATASETS.get(tag, (None, None))
    return dataset if num_classes == dataset_classes else None


def _model_card(
        model: nn.Module,
        arch: str,
        dataset: Optional[str],
        repo_id: str,
) -> Dict[str, Any]:
    """Model card entries in the format of timm's `generate_readme`."""
    cfg = model.pretrained_cfg
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': f'{num_params(model) / 1e6:.1f}',
            'Image size': f'{model.img_size[0]} x {model.img_size[1]}',
            'Classes': model.num_classes,
        },
        'Papers': {cfg.get('paper_name', 'CabViT'): 'https://arxiv.org/abs/2211.07198'},
    }
    if dataset:
        details['Dataset'] = dataset
    usage = (
        '```python\n'
        'import timm\n'
        'import timm_cabvit  # registers the CabViT models with timm\n\n'
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
        'data_config = timm.data.resolve_model_data_config(model)\n'
        'transforms = timm.data.create_transform(**data_config, is_training=False)\n'
        '```\n\n'
        'With Hugging Face transformers (timm-cabvit installed, no import needed):\n\n'
        '```python\n'
        'from transformers import pipeline\n\n'
        f"classify = pipeline('image-classification', model='{repo_id}')\n"
        '```')
    return dict(
        description=(
            f'A CabViT ({arch}) image classification model: vision transformer blocks that also attend to tokens '
            f'merged from the earlier blocks of their stage. Weights for `timm` with the `timm-cabvit` package.'),
        details=details,
        usage=usage,
        citation=_CITATION,
        license=cfg.get('license', 'apache-2.0'),
        tags=['image-classification', 'timm', 'timm-cabvit'],
    )


def _metrics_section(metrics: Optional[Dict[str, Union[float, str]]]) -> str:
    """The evaluation results as a markdown table, before the citation."""
    if not metrics:
        return ''
    rows = ''.join(f'| {k} | {v} |\n' for k, v in metrics.items())
    return f'\n## Results\n| metric | value |\n|---|---|\n{rows}'


def _check_export_folder(folder: Path) -> Dict[str, Any]:
    """The folder's config, after checking it holds what timm needs to load it from the Hub."""
    config_path = folder / HUB_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"'{folder}' has no {HUB_CONFIG}: write the folder with `timm-cabvit export` (export_checkpoint) first.")
    try:
        config = json.loads(config_path.read_text(encoding='utf-8'))
    except ValueError as e:
        raise CheckpointError(f"'{config_path}' is not valid JSON ({e}); export the folder again.") from e
    if config.get('architecture') not in timm.list_models('cabvit_*'):
        raise CheckpointError(
            f"'{config_path}' names architecture {config.get('architecture')!r}, not a CabViT model; "
            f"export the folder again.")
    check_checkpoint_file(folder / HUB_WEIGHTS)
    return config


def push(
        folder: PathLike,
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        commit_message: str = 'Add CabViT weights',
) -> str:
    """Upload a folder written by `export_checkpoint` to a Hub model repo, creating the repo if needed.

    Args:
        folder: Output folder of `export_checkpoint`.
        repo_id: 'ORG/NAME' of the model repo.
        token: Hub token with write access; default: the one of `hf auth login` or HF_TOKEN.
        private: Create the repo private.
        revision: Branch to commit to.
        create_pr: Open a pull request instead of committing.
        commit_message: Message of the commit.

    Returns:
        URL of the commit (or pull request).
    """
    folder = Path(folder)
    _check_export_folder(folder)
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
        )
    except _CONNECTION_ERRORS as e:
        raise _explain_push_error(e, folder, repo_id) from e
    return commit.pr_url or commit.commit_url


# huggingface_hub raises its HfHubHTTPError for an HTTP error status; for a failed connection, the errors of the HTTP
# library it uses: requests' are OSErrors, httpx's derive from the HTTPError that HfHubHTTPError extends.
_CONNECTION_ERRORS = (HfHubHTTPError, OSError, *HfHubHTTPError.__bases__)


def _explain_push_error(error: Exception, folder: Path, repo_id: str) -> CheckpointError:
    """A CheckpointError naming the repo, what went wrong with the upload and what to do, in one line."""
    what = f"Uploading '{folder}' to Hugging Face Hub repo '{repo_id}' failed"
    login = (f"log in with `hf auth login` (or set HF_TOKEN, or pass a token) with a token that may write to "
             f"'{repo_id.split('/')[0]}'")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        return CheckpointError(f'{what}: HF_HUB_OFFLINE is set. Unset it, with network access, to push.')
    if isinstance(error, LocalTokenNotFoundError):
        return CheckpointError(f'{what}: no Hub token. To push, {login}.')
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, 'status_code', None)
        if status in (401, 403):
            return CheckpointError(f'{what}: the Hub refused the token ({reason}). To push, {login}.')
        return CheckpointError(f'{what} ({reason}). If the repo is not yours, {login}.')
    return CheckpointError(
        f'{what}: could not reach {constants.ENDPOINT} ({reason}). Check the network connection (and HF_ENDPOINT, '
        f'or a proxy), then push again.')
