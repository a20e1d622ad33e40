"""Drop RAda's trainers into an existing CoOp, MaPLe or PromptSRC checkout.

Put this repository on PYTHONPATH and add two lines to the host's train.py:

    import rada_plugin                 # next to the host's `import trainers.coop` lines
    ...
    def extend_cfg(cfg):
        ...                            # the host's own keys
        rada_plugin.extend_cfg(cfg)    # last line of the host's extend_cfg

Then `python train.py --trainer RAdaCoOp ...` runs with the host's datasets and scripts.
The host has its own `trainers` package, so ours is loaded under the name `rada_trainers`
(its modules import each other relatively); trainer names and config keys the host already
registered (CoOp, MaPLe, ZeroshotCLIP, TRAINER.COOP.*, ...) keep the host's definitions.
"""

import importlib
import importlib.util
import os
import sys

PACKAGE_ALIAS = "rada_trainers"
_TRAINERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers")


def _load_trainers_package():
    if PACKAGE_ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE_ALIAS, os.path.join(_TRAINERS_DIR, "__init__.py"), submodule_search_locations=[_TRAINERS_DIR]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE_ALIAS] = package
        spec.loader.exec_module(package)
    importlib.import_module(f"{PACKAGE_ALIAS}.register")
    return importlib.import_module(f"{PACKAGE_ALIAS}.config")


_config = _load_trainers_package()


def extend_cfg(cfg):
    """Add the keys our trainers read; keys the host already declares keep the host's values."""
    ours = cfg.clone()
    _config.extend_cfg(ours)
    _add_missing(cfg, ours)


def _add_missing(host, ours):
    for key, value in ours.items():
        if key not in host:
            host[key] = value
        elif isinstance(value, dict) and isinstance(host[key], dict):
            _add_missing(host[key], value)
