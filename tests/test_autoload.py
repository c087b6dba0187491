"""Installing the package is enough: timm's own tools find the models without `import timm_cabvit`.

Each test environment is a fresh virtual environment with this repository installed into it (as a wheel
or editable; see fresh_env.py).
"""
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fresh_env import FreshEnv

REPO = Path(__file__).resolve().parents[1]
TRAIN_OPTIONS = frozenset(
    word for line in (REPO / 'tests' / 'data' / 'timm_train_options.txt').read_text().splitlines()
    if not line.startswith('#') for word in line.split())


@pytest.fixture(scope='module', params=['wheel', 'editable'])
def fresh_env(request, tmp_path_factory):
    return FreshEnv(tmp_path_factory.mktemp(request.param), editable=request.param == 'editable')


@pytest.mark.integration
def test_import_timm_registers_the_models(fresh_env, tmp_path):
    """`import timm` registers the models, also after `importlib.util.find_spec('timm')` (transformers asks so
    on import, long before it imports timm), and a Hub config naming a CabViT architecture resolves, as timm loads
    `hf-hub:` repos (here a local folder). One interpreter for all three: each start costs seconds."""
    (tmp_path / 'config.json').write_text(json.dumps({
        'architecture': 'cabvit_h_l1', 'num_classes': 3,
        'pretrained_cfg': {'input_size': [3, 224, 224], 'mean': [0.5] * 3, 'std': [0.5] * 3}}))
    out = fresh_env.run(
        'import importlib.util, sys\n'
        'assert "torch" not in sys.modules and "timm" not in sys.modules\n'
        'assert importlib.util.find_spec("timm") and importlib.util.find_spec("timm")\n'
        'assert "timm" not in sys.modules\n'
        'import timm\n'
        'model = timm.create_model("cabvit_h_l1")\n'
        'print(" ".join(timm.list_models("cabvit*")), type(model).__module__)\n'
        'print(sum(type(f).__name__ == "TimmImportFinder" for f in sys.meta_path))\n'
        f'model = timm.create_model("local-dir:{tmp_path}", pretrained=False)\n'
        'print(type(model).__name__, model.num_classes)').stdout
    assert out.split() == [
        'cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3', 'cabvit_p_l0', 'timm_cabvit.cabvit', '0', 'CabViT', '3']


@pytest.mark.integration
def test_opt_out_and_start_up_footprint(fresh_env):
    modules = 'import sys, json; print(json.dumps(sorted(sys.modules)))'
    loaded = set(json.loads(fresh_env.run(modules).stdout))
    loaded_without = set(json.loads(fresh_env.run(modules, env={'TIMM_CABVIT_AUTOLOAD': '0'}).stdout))
    assert loaded - loaded_without == {'timm_cabvit_autoload'}  # the whole start-up cost: one small module
    assert not {'torch', 'timm', 'timm_cabvit'} & loaded
    assert fresh_env.run('import timm; print(timm.list_models("cabvit*"))',
                         env={'TIMM_CABVIT_AUTOLOAD': '0'}).stdout.strip() == '[]'


@pytest.mark.integration
def test_two_training_steps_and_eval_with_timm_factories(tmp_path):
    """Training needs one install kind: the wheel's registration is the editable one's (tested above)."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split in ('train', 'val'):
        for label in ('a', 'b'):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = torch.randint(0, 256, (48, 48, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f'{i}.png')
    code = f'''
import json, timm, torch
from timm.data import create_dataset, create_loader
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy
torch.manual_seed(0)
model = timm.create_model('cabvit_h_l1', num_classes=2, img_size=64, ls_init_value=0.1)
loader_args = dict(input_size=(3, 64, 64), batch_size=4, use_prefetcher=False, num_workers=0)
train = create_loader(create_dataset('', root='{tmp_path}/train', is_training=True), is_training=True,
                      no_aug=True, **loader_args)
evaluation = create_loader(create_dataset('', root='{tmp_path}/val'), is_training=False, **loader_args)
optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
scheduler, _ = create_scheduler_v2(optimizer, 'cosine', num_epochs=2, warmup_epochs=0)
x, target = next(iter(train))
losses = []
model.train()
for epoch in range(2):
    loss = torch.nn.functional.cross_entropy(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step(epoch + 1)
    losses.append(loss.item())
losses.append(torch.nn.functional.cross_entropy(model(x), target).item())
model.eval()
with torch.no_grad():
    top1 = [accuracy(model(images), labels, topk=(1,))[0].item() for images, labels in evaluation]
print(json.dumps(dict(losses=losses, top1=top1)))
'''
    result = json.loads(FreshEnv(tmp_path / 'env', editable=True).run(code).stdout)
    losses = result['losses']
    assert all(map(lambda v: v == v and abs(v) < 1e3, losses)), losses
    assert losses[0] > losses[1] > losses[2], losses
    assert len(result['top1']) == 1 and 0 <= result['top1'][0] <= 100


@pytest.mark.integration
def test_broken_install_never_breaks_start_up(tmp_path):
    env = FreshEnv(tmp_path / 'broken', editable=False)
    (env.purelib / 'timm_cabvit' / 'cabvit.py').write_text("raise ImportError('deliberately broken')\n")
    started = env.run('pass')
    assert started.returncode == 0 and started.stderr == ''
    imported = env.run('import timm; print(timm.list_models("cabvit*"))', args=['-W', 'default'])
    warnings = [line for line in imported.stderr.splitlines() if 'could not register its timm models' in line]
    assert len(warnings) == 1 and 'deliberately broken' in warnings[0], imported.stderr
    assert imported.stdout.strip() == '[]'


@pytest.mark.integration
def test_uninstall_removes_the_start_up_hook(tmp_path):
    env = FreshEnv(tmp_path / 'uninstall', editable=False)
    assert (env.purelib / 'timm_cabvit_autoload.pth').exists()
    env.run_argv(['-m', 'pip', 'uninstall', '--quiet', '--yes', 'timm-cabvit'])
    assert not (env.purelib / 'timm_cabvit_autoload.pth').exists()
    assert not (env.purelib / 'timm_cabvit_autoload.py').exists()


@pytest.mark.parametrize('model_name', ['cabvit_p_l0', 'cabvit_h_l1', 'cabvit_h_l2', 'cabvit_h_l3'])
def test_recipes_are_train_py_configs(model_name):
    from timm_cabvit_cli import recipe_path
    recipe = yaml.safe_load(recipe_path(model_name).read_text())
    assert not set(recipe) - TRAIN_OPTIONS, f'not train.py options: {set(recipe) - TRAIN_OPTIONS}'
    assert recipe['model'] == model_name and recipe['model'] in timm.list_models('cabvit*')
    assert recipe['batch_size'] * 8 == 1024
    assert recipe['lr'] == (2e-3 if model_name.startswith('cabvit_h') else 1e-3)
