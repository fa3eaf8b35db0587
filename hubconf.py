"""torch.hub entry points: every model this repository registers in timm, plus DeiT's published models.

    model = torch.hub.load(REPO_DIR, 'deit_small_patch16_224', source='local', pretrained=True)
    model = torch.hub.load(REPO_DIR, 'dhvt_tiny_patch4_32', source='local', checkpoint_path='checkpoint.pth')

A main.py checkpoint brings its class count and input size (its saved args); kwargs override them.

Each entry is `name(pretrained=False, checkpoint_path=None, **kwargs)`; kwargs go to timm.create_model.
"""
import timm

import checkpoints
import model_factory
import models  # noqa: F401 - importing it registers every family of ours in timm
import utils

dependencies = ['torch', 'timm']

# timm records the name of the module that registered each model; 'deit' is timm's own DeiT / DeiT III module,
# whose cfgs point at the facebookresearch/deit weights.
_MODULES = ('models', 'localvit_models', 'dhvt_models', 'evit_models', 'patchconvnet_models', 'deit')


def _create(name, pretrained, checkpoint_path, kwargs):
    if pretrained and checkpoint_path:
        raise ValueError(f'{name}: pass either pretrained=True or checkpoint_path=, not both')
    if pretrained:
        return _create_pretrained(name, kwargs)
    if not checkpoint_path:
        return timm.create_model(name, **kwargs)
    model = _create_for_checkpoint(name, str(checkpoint_path), kwargs)
    _load_checkpoint(model, name, checkpoint_path)
    return model


def _create_for_checkpoint(name, path, kwargs):
    """The model at the class count and input size a main.py checkpoint was trained with, unless kwargs say."""
    saved = utils.saved_args(path)
    saved = saved if saved.get('model') in (name, None) else {}
    if 'num_classes' not in kwargs and isinstance(saved.get('nb_classes'), int):
        kwargs = dict(kwargs, num_classes=saved['nb_classes'])
    if 'img_size' not in kwargs and isinstance(saved.get('input_size'), int):
        return model_factory.create_at_size(name, saved['input_size'], **kwargs)
    return timm.create_model(name, **kwargs)


def _create_pretrained(name, kwargs):
    """timm fetches the cfg's weights (Hugging Face hub first, else its url) with weights_only loading."""
    source = model_factory.published_weights(name, kwargs.get('pretrained_cfg_overlay'))
    if not source:
        raise ValueError(f'{name} has no published weights; train it with main.py and pass the file with '
                         "checkpoint_path='.../checkpoint.pth'")
    try:
        if not kwargs.get('pretrained_cfg_overlay'):  # the cfg's own source: one attempt at the hub, or its cache
            source, where = model_factory.prepare_published(name)
            kwargs = dict(kwargs, **where)
        return timm.create_model(name, pretrained=True, **kwargs)
    except model_factory.HubUnreachable as e:
        raise RuntimeError(f'could not fetch the {name} weights from {e}; download them yourself and pass the local '
                           "file with checkpoint_path='...'") from e
    except OSError as e:
        raise RuntimeError(f'could not fetch the {name} weights from {source} ({model_factory.fetch_failure(e)}); '
                           "download them yourself and pass the local file with checkpoint_path='...'") from e


def _load_checkpoint(model, name, path):
    """A main.py or DeiT checkpoint, a bare state dict, or a .safetensors file, through the training's own loader."""
    try:
        checkpoints.load_weights(model, str(path), 'checkpoint_path', fix=f'pass a checkpoint of {name} built with '
                                 'the same kwargs (num_classes=, img_size=, ...)')
    except utils.UserError as e:
        raise ValueError(str(e)) from e


def _entry(name, module):
    def entry(pretrained=False, checkpoint_path=None, **kwargs):
        return _create(name, pretrained, checkpoint_path, kwargs)

    origin = "timm's deit.py" if module == 'deit' else f'{module}.py'
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f'{name}: a timm model from {origin}.\n\n'
        'pretrained: load the weights its pretrained_cfg publishes (an error when it publishes none).\n'
        'checkpoint_path: a local .pth (a main.py checkpoint or a bare state dict) or .safetensors file.\n'
        'kwargs: passed to timm.create_model (num_classes=, img_size=, drop_path_rate=, ...).')
    return entry


for _module in _MODULES:
    for _name in timm.list_models(module=_module):
        globals()[_name] = _entry(_name, _module)
