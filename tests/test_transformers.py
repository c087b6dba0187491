"""Hugging Face transformers loads a folder written by `timm-cabvit export` and gives timm's logits.

transformers reads the folder through its TimmWrapper (`AutoModelForImageClassification`, `AutoImageProcessor`,
`pipeline('image-classification')`), which builds the model with `timm.create_model`: the models must be registered
by the package's start-up hook alone. So transformers runs in a subprocess that never imports timm_cabvit (nor
timm itself: transformers does), offline, on the same image file that timm classifies here.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from timm_cabvit.tools import hub

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('transformers') is None, reason='transformers is not installed (pip install ".[hf]")')

IMG_SIZE = (64, 96)  # the export's input size, not square, so that the processor's resize and crop show
LABELS = ['cat', 'dog', 'bird', 'fish', 'frog']

TRANSFORMERS_SIDE = textwrap.dedent("""
    import json, sys
    folder, image_file, out_file = sys.argv[1:]
    import torch
    import transformers
    from PIL import Image
    assert 'timm_cabvit' not in sys.modules and 'timm' not in sys.modules

    image = Image.open(image_file)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder)
    assert 'timm_cabvit' in sys.modules  # registered by the start-up hook when transformers imported timm
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(image)['pixel_values']
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
    classify = transformers.pipeline('image-classification', model=folder)
    json.dump({
        'model': type(model).__name__,
        'training': model.training,
        'id2label': model.config.id2label,
        'pixel_values': pixel_values.tolist(),
        'logits': logits.tolist(),
        'pipeline': classify(image, top_k=None),
    }, open(out_file, 'w'))
""")


@pytest.fixture(scope='module')
def exported(tmp_path_factory, one_thread):
    """A cabvit_h_l1 with random weights (distinct logits), exported with class names at a non-square size."""
    torch.manual_seed(0)
    model = timm.create_model('cabvit_h_l1', num_classes=len(LABELS), img_size=IMG_SIZE)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.is_floating_point():
                p.copy_(p.abs() + 0.5 if name.endswith('running_var') else p + 0.05 * torch.randn_like(p))
    tmp = tmp_path_factory.mktemp('transformers')
    torch.save({'state_dict': model.state_dict()}, tmp / 'checkpoint.pth.tar')
    folder = hub.export_checkpoint(tmp / 'checkpoint.pth.tar', 'cabvit_h_l1', tmp / 'export', img_size=IMG_SIZE,
                                   label_names=LABELS)
    image_file = tmp / 'image.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (83, 131, 3), dtype=np.uint8)).save(image_file)
    return folder, image_file


@pytest.fixture(scope='module')
def from_transformers(exported, tmp_path_factory):
    folder, image_file = exported
    out_file = tmp_path_factory.mktemp('result') / 'result.json'
    env = {k: v for k, v in os.environ.items() if not k.startswith('TIMM_CABVIT')}
    env.update(HF_HUB_OFFLINE='1', HF_HUB_DISABLE_TELEMETRY='1', TRANSFORMERS_VERBOSITY='error', OMP_NUM_THREADS='1',
               HF_HOME=str(tmp_path_factory.mktemp('hf_home')))
    result = subprocess.run([sys.executable, '-c', TRANSFORMERS_SIDE, str(folder), str(image_file), str(out_file)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out_file.read_text())


@pytest.fixture(scope='module')
def from_timm(exported):
    """timm's own loading of the folder, and its transform of the image."""
    folder, image_file = exported
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    pixel_values = transform(Image.open(image_file).convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        return model, pixel_values, model(pixel_values)


def test_timm_loads_the_export_as_before(exported, from_timm):
    folder, _ = exported
    model, pixel_values, _ = from_timm
    assert model.num_classes == len(LABELS) and model.img_size == IMG_SIZE
    assert pixel_values.shape == (1, 3, *IMG_SIZE)
    config = json.loads((folder / 'config.json').read_text())
    assert config['num_classes'] == len(LABELS) and config['label_names'] == LABELS
    assert 'num_classes' not in config['model_args']  # transformers passes its own num_classes beside model_args


@pytest.mark.integration
def test_same_preprocessing_and_logits_as_timm(from_transformers, from_timm):
    _, pixel_values, logits = from_timm
    assert from_transformers['model'] == 'TimmWrapperForImageClassification' and not from_transformers['training']
    torch.testing.assert_close(torch.tensor(from_transformers['pixel_values']), pixel_values, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(from_transformers['logits']), logits, rtol=1e-5, atol=1e-5)
    assert logits.std() > 0.1  # the classes are told apart, so the comparison means something


@pytest.mark.integration
def test_pipeline_labels_and_scores(from_transformers, from_timm):
    _, _, logits = from_timm
    assert from_transformers['id2label'] == {str(i): name for i, name in enumerate(LABELS)}
    probabilities = logits.softmax(-1)[0]
    expected = sorted(zip(LABELS, probabilities.tolist()), key=lambda item: -item[1])
    got = from_transformers['pipeline']
    assert [item['label'] for item in got] == [label for label, _ in expected]
    torch.testing.assert_close(torch.tensor([item['score'] for item in got]),
                               torch.tensor([score for _, score in expected]), rtol=1e-5, atol=1e-6)


def test_label_names_must_fit_the_classes(tmp_path):
    state_dict = timm.create_model('cabvit_h_l1', num_classes=3, img_size=64).state_dict()
    with pytest.raises(hub.CheckpointError, match='2 label names for a checkpoint with 3 classes'):
        hub.export_checkpoint(state_dict, 'cabvit_h_l1', tmp_path, img_size=64, label_names=['a', 'b'])
    with pytest.raises(hub.CheckpointError, match='not one string'):
        hub.export_checkpoint(state_dict, 'cabvit_h_l1', tmp_path, img_size=64, label_names='abc')
