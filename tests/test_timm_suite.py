"""timm's own model tests (`tests/test_models.py` of the installed timm's sdist), run against our models.

timm parametrizes its generic tests over the whole registry, so after `import timm_cabvit` our models are
already in them; some are keyed on a list of timm's own module names and some on hand-picked timm models,
so each applicable test is called here explicitly for our four models. What is left out, and why:

- `test_model_default_cfgs` for cabvit_p_l0: a plain ViT's `forward_features` is a token sequence, which timm
  itself tests with `test_model_default_cfgs_non_std` (as for deit and vit); that one runs instead.
- `test_model_load_pretrained`, `test_model_features_pretrained`, `test_model_inference`: need published
  ImageNet weights, which do not exist yet; loading through timm's machinery is tested in test_hub.py.
- `test_features_only_grad_checkpointing_backward`, `test_forward_after_prune_intermediate_layers`: feed
  64x64 / 128x128 images to a model built for 224 (ours are fixed-size like LeViT and EfficientFormer, the
  bias tables are sized at creation); test_models.py here runs the same checks at the built size.
- model-family tests (swin, naflexvit, levit internals, ...) test those families' own code.
"""
import pytest
from support import ALL_MODELS, H_MODELS
from timm_suite import load_test_models

# (test name, batch size or None, models); batch sizes as timm's own parametrization
GENERIC_TESTS = [
    ('test_model_forward', 1, ALL_MODELS),
    ('test_model_backward', 2, ALL_MODELS),
    ('test_model_default_cfgs', 1, H_MODELS),
    ('test_model_default_cfgs_non_std', 1, ['cabvit_p_l0']),
    ('test_model_forward_torchscript', 1, ALL_MODELS),
    ('test_model_forward_features', 1, ALL_MODELS),
    ('test_model_forward_intermediates_features', 1, ALL_MODELS),
    ('test_model_forward_intermediates', 1, ALL_MODELS),
    ('test_model_forward_fx', 1, ALL_MODELS),
    ('test_model_backward_fx', 2, ALL_MODELS),
    ('test_model_forward_fx_torchscript', 1, ALL_MODELS),
    ('test_prune_intermediate_layers_contract', None, ALL_MODELS),
    ('test_prune_intermediate_layers_params_used', None, ALL_MODELS),
]
SLOW_MODELS = ('cabvit_h_l2', 'cabvit_h_l3')
CFG_TESTS = ('test_model_default_cfgs', 'test_model_default_cfgs_non_std')


def _cases():
    for test_name, batch_size, models in GENERIC_TESTS:
        for model_name in models:
            # l2 and l3 share every code path with l1 and run only when slow tests do (their cfg tests take 7-11 s)
            marks = [pytest.mark.slow] if model_name in SLOW_MODELS else []
            yield pytest.param(test_name, batch_size, model_name, id=f'{test_name}[{model_name}]', marks=marks)


@pytest.fixture(scope='session')
def timm_tests():
    return load_test_models()


@pytest.mark.parametrize('test_name, batch_size, model_name', list(_cases()))
def test_timm_generic(timm_tests, test_name, batch_size, model_name):
    test_fn = getattr(timm_tests, test_name)
    args = [model_name] if batch_size is None else [model_name, batch_size]
    if test_name in CFG_TESTS:
        args.append('meta')
    test_fn(*args)


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_timm_headless_checkpoint_reload(timm_tests, model_name):
    timm_tests.test_headless_checkpoint_reload(model_name, {})


@pytest.mark.parametrize('model_name', ALL_MODELS)
def test_timm_init_weights_after_to_empty(timm_tests, model_name):
    timm_tests.test_model_init_weights_after_to_empty(model_name, dict(img_size=64))
